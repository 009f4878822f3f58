//! Upstream's rows: the Backend.AI App Proxy coordinator 26.9.x's tables
//! (`workers`, `worker_app_filters`, `circuits`, `endpoints`, `tokens`) read
//! from its PostgreSQL, after a check of its alembic revision.
//!
//! Upstream keeps enums as PostgreSQL ENUMs holding the Python member's
//! *name* (`PORT`, `WILDCARD_DOMAIN`, `HTTP2`, `INFERENCE`); they are read as
//! text here and turned into Backend.AI's wire values by [`super::map`].

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{ConnectOptions, PgPool};
use uuid::Uuid;

/// The alembic revisions whose schema this reader knows: the head of
/// backend-ai-appproxy-coordinator 26.9.x (`add_endpoint_health_check_table`).
pub const KNOWN_REVISIONS: &[&str] = &["a1b2c3d4e5f6"];

/// A row of upstream's `workers`, with its `worker_app_filters`.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct UpstreamWorker {
    pub id: Uuid,
    pub authority: String,
    pub frontend_mode: String,
    pub protocol: String,
    pub hostname: String,
    pub tls_listen: bool,
    pub tls_advertised: bool,
    pub api_port: i32,
    pub port_range: Option<Vec<i32>>,
    pub wildcard_domain: Option<String>,
    pub wildcard_traffic_port: Option<i32>,
    pub nodes: i32,
    pub accepted_traffics: Vec<String>,
    pub filtered_apps_only: bool,
    pub traefik_last_used_marker_path: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub status: String,
    /// `(property_name, property_value)` of its `worker_app_filters`.
    #[sqlx(skip)]
    pub filters: Vec<(String, String)>,
}

/// A row of upstream's `circuits`.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct UpstreamCircuit {
    pub id: Uuid,
    pub app: Option<String>,
    pub protocol: String,
    pub worker: Uuid,
    pub app_mode: String,
    pub frontend_mode: String,
    pub port: Option<i32>,
    pub subdomain: Option<String>,
    pub envs: Option<Json<serde_json::Value>>,
    pub arguments: Option<String>,
    pub open_to_public: bool,
    pub allowed_client_ips: Option<String>,
    pub user_id: Option<Uuid>,
    pub endpoint_id: Option<Uuid>,
    pub runtime_variant: Option<String>,
    pub session_ids: Vec<Uuid>,
    pub route_info: Json<serde_json::Value>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// A row of upstream's `endpoints`: a model service's health check.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct UpstreamEndpoint {
    pub id: Uuid,
    pub health_check_enabled: bool,
    pub health_check_config: Option<Json<serde_json::Value>>,
}

/// A row of upstream's `tokens` (what `POST /v2/conf` stored).
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct UpstreamToken {
    pub id: Uuid,
    pub login_session_token: Option<String>,
    pub kernel_host: String,
    pub kernel_port: i32,
    pub session_id: Uuid,
    pub user_uuid: Uuid,
    pub group_id: Uuid,
    pub access_key: String,
    pub domain_name: String,
}

/// Everything read from upstream's database.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Upstream {
    pub revision: String,
    pub workers: Vec<UpstreamWorker>,
    pub circuits: Vec<UpstreamCircuit>,
    pub endpoints: Vec<UpstreamEndpoint>,
    pub tokens: Vec<UpstreamToken>,
}

/// Connects to upstream's database (`postgres://…`), read-only.
pub async fn connect(url: &str) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url
        .parse()
        .context("--from: not a PostgreSQL URL (postgres://user:password@host:port/database)")?;
    let options = options
        .options([("default_transaction_read_only", "on")])
        .disable_statement_logging();
    PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .context("connecting to upstream's database")
}

/// The alembic revision of upstream's schema, refused (and named) unless
/// it is one of [`KNOWN_REVISIONS`].
pub async fn check_revision(pool: &PgPool) -> anyhow::Result<String> {
    let revision: Option<(String,)> = sqlx::query_as("SELECT version_num FROM alembic_version")
        .fetch_optional(pool)
        .await
        .context("reading upstream's alembic_version (is this a Backend.AI App Proxy coordinator database?)")?;
    let Some((revision,)) = revision else {
        bail!("upstream's alembic_version is empty: its schema was never migrated");
    };
    if !KNOWN_REVISIONS.contains(&revision.as_str()) {
        bail!(
            "upstream's schema is at alembic revision {revision}, which this import does not know \
             (it reads {}: backend-ai-appproxy-coordinator 26.9.x)",
            KNOWN_REVISIONS.join(", ")
        );
    }
    Ok(revision)
}

/// Reads every row the import maps, in one read-only transaction (a
/// consistent snapshot even if upstream still runs).
pub async fn read(pool: &PgPool) -> anyhow::Result<Upstream> {
    let revision = check_revision(pool).await?;
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await?;
    let mut workers: Vec<UpstreamWorker> = sqlx::query_as(
        "SELECT id, authority, frontend_mode::text AS frontend_mode, protocol::text AS protocol, \
         hostname, tls_listen, tls_advertised, api_port, port_range, wildcard_domain, \
         wildcard_traffic_port, nodes, accepted_traffics::text[] AS accepted_traffics, \
         filtered_apps_only, traefik_last_used_marker_path, created_at, updated_at, status \
         FROM workers ORDER BY id",
    )
    .fetch_all(&mut *tx)
    .await
    .context("reading upstream's workers")?;
    let filters: Vec<(Uuid, String, String)> = sqlx::query_as(
        "SELECT worker, property_name, property_value FROM worker_app_filters \
         ORDER BY worker, property_name, property_value",
    )
    .fetch_all(&mut *tx)
    .await
    .context("reading upstream's worker_app_filters")?;
    for (worker, name, value) in filters {
        if let Some(w) = workers.iter_mut().find(|w| w.id == worker) {
            w.filters.push((name, value));
        }
    }
    let circuits = sqlx::query_as(
        "SELECT id, app, protocol::text AS protocol, worker, app_mode::text AS app_mode, \
         frontend_mode::text AS frontend_mode, port, subdomain, envs, arguments, open_to_public, \
         allowed_client_ips, user_id, endpoint_id, runtime_variant, session_ids, route_info, \
         created_at, updated_at FROM circuits ORDER BY created_at, id",
    )
    .fetch_all(&mut *tx)
    .await
    .context("reading upstream's circuits")?;
    let endpoints = sqlx::query_as(
        "SELECT id, health_check_enabled, health_check_config FROM endpoints ORDER BY id",
    )
    .fetch_all(&mut *tx)
    .await
    .context("reading upstream's endpoints")?;
    let tokens = sqlx::query_as(
        "SELECT id, login_session_token, kernel_host, kernel_port, session_id, user_uuid, \
         group_id, access_key, domain_name FROM tokens ORDER BY id",
    )
    .fetch_all(&mut *tx)
    .await
    .context("reading upstream's tokens")?;
    tx.commit().await?;
    Ok(Upstream {
        revision,
        workers,
        circuits,
        endpoints,
        tokens,
    })
}
