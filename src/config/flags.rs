//! The command line: subcommands and one flag per setting, each falling
//! back to its `APPPROXY_*` variable (clap reads the environment, so
//! `--help` lists the variable next to its flag), then to the config file
//! and the defaults ([`super::Config::load`] merges them).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use super::LogFormat;

/// Command line of `appproxy-coordinator`.
#[derive(Debug, Parser)]
#[command(name = "appproxy-coordinator", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub options: Options,
}

#[derive(Clone, Debug, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Run the coordinator (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Print the effective configuration (secrets redacted) and exit.
    Config,
    /// Print the AppProxyRoute CustomResourceDefinition (YAML) and exit.
    Crdgen,
    /// Import a Backend.AI App Proxy coordinator's (26.9.x) workers, circuits,
    /// endpoints and conf tokens from its PostgreSQL into this database, with
    /// their ids, ports and subdomains, in one transaction.
    ImportBackendai(ImportFlags),
    /// Export this coordinator's Backend.AI workers, circuits, endpoints and
    /// conf tokens into an empty Backend.AI App Proxy coordinator (26.9.x)
    /// database made by its own migrations, in one transaction (the way back).
    ExportBackendai(ExportFlags),
}

/// `import-backendai`'s own flags.
#[derive(Clone, Debug, PartialEq, Eq, Args)]
pub struct ImportFlags {
    /// Upstream's database: postgres://user:password@host:port/database
    /// (read only; the password is never printed).
    #[arg(long, env = "APPPROXY_IMPORT_FROM", hide_env_values = true)]
    pub from: String,
    /// Print what would be imported and every conflict; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Import into a database that holds routes of its own; a port or
    /// subdomain taken here is reported, not overwritten.
    #[arg(long)]
    pub merge: bool,
}

/// `export-backendai`'s own flags.
#[derive(Clone, Debug, PartialEq, Eq, Args)]
pub struct ExportFlags {
    /// Upstream's database: postgres://user:password@host:port/database, empty,
    /// made by upstream's `schema oneshot` (the password is never printed;
    /// prefer the environment variable, which `ps` does not show).
    #[arg(long, env = "APPPROXY_EXPORT_TO", hide_env_values = true)]
    pub to: String,
    /// Check everything and run the inserts in a transaction that is rolled
    /// back; write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Flags; each falls back to its `APPPROXY_*` variable, then the config file.
#[derive(Debug, Default, Args, Serialize)]
pub struct Options {
    /// TOML configuration file.
    #[arg(long, global = true, env = "APPPROXY_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:6030].
    #[arg(long, global = true, env = "APPPROXY_BIND")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<SocketAddr>,
    /// postgres://… for PostgreSQL; the embedded SQLite file in the data directory if unset.
    #[arg(
        long,
        global = true,
        env = "APPPROXY_DATABASE_URL",
        hide_env_values = true
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// Directory for the embedded database and generated tokens [default: ./data].
    #[arg(long, global = true, env = "APPPROXY_DATA_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Bearer token of the manager (route and session endpoints).
    #[arg(
        long,
        global = true,
        env = "APPPROXY_MANAGER_TOKEN",
        hide_env_values = true
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manager_token: Option<String>,
    /// File holding the manager token.
    #[arg(long, global = true, env = "APPPROXY_MANAGER_TOKEN_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manager_token_file: Option<PathBuf>,
    /// Bootstrap token workers register with.
    #[arg(
        long,
        global = true,
        env = "APPPROXY_WORKER_TOKEN",
        hide_env_values = true
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_token: Option<String>,
    /// File holding the worker bootstrap token.
    #[arg(long, global = true, env = "APPPROXY_WORKER_TOKEN_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_token_file: Option<PathBuf>,
    /// Token of the read-only status page (/ui) [default: none; the manager
    /// token logs in too].
    #[arg(
        long,
        global = true,
        env = "APPPROXY_VIEWER_TOKEN",
        hide_env_values = true
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub viewer_token: Option<String>,
    /// File holding the viewer token.
    #[arg(long, global = true, env = "APPPROXY_VIEWER_TOKEN_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub viewer_token_file: Option<PathBuf>,
    /// Serve the status page at /ui [default: true]; `--ui=false` turns it off.
    #[arg(
        long,
        global = true,
        env = "APPPROXY_UI",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ui: Option<bool>,
    /// PEM certificate chain; serves HTTPS when given with --tls-key.
    #[arg(long, global = true, env = "APPPROXY_TLS_CERT", requires = "tls_key")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, global = true, env = "APPPROXY_TLS_KEY", requires = "tls_cert")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// Log format [default: text].
    #[arg(long, global = true, env = "APPPROXY_LOG_FORMAT", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// OTLP/HTTP collector to export spans to, e.g. http://otel-collector:4318
    /// (spans go to <url>/v1/traces, HTTP/protobuf) [default: off].
    #[arg(long, global = true, env = "APPPROXY_OTLP_ENDPOINT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// Do not apply migrations at start (run `migrate` separately).
    #[arg(long, global = true, env = "APPPROXY_NO_MIGRATE")]
    #[serde(skip_serializing_if = "std::ops::Not::not", rename = "no_migrate")]
    pub no_migrate: bool,
    /// Largest accepted request body in bytes [default: 1048576].
    #[arg(long, global = true, env = "APPPROXY_MAX_BODY_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<usize>,
    /// Database connections per process [default: 16].
    #[arg(long, global = true, env = "APPPROXY_MAX_CONNECTIONS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// How long open connections get to finish at shutdown, e.g. "10s" [default: 10s].
    #[arg(long, global = true, env = "APPPROXY_SHUTDOWN_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option",
        default
    )]
    pub shutdown_timeout: Option<Duration>,
    /// How often idle watch streams get a bookmark [default: 10s].
    #[arg(long, global = true, env = "APPPROXY_BOOKMARK_INTERVAL", value_parser = humantime::parse_duration)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option",
        default
    )]
    pub bookmark_interval: Option<Duration>,
    /// Keep-alive comments on idle watch streams [default: 15s].
    #[arg(long, global = true, env = "APPPROXY_KEEPALIVE_INTERVAL", value_parser = humantime::parse_duration)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option",
        default
    )]
    pub keepalive_interval: Option<Duration>,
    /// Safety-net poll of the change log, besides commit wake-ups [default: 1s].
    #[arg(long, global = true, env = "APPPROXY_POLL_INTERVAL", value_parser = humantime::parse_duration)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option",
        default
    )]
    pub poll_interval: Option<Duration>,
    /// Change-log rows always kept, newest first [default: 100000].
    #[arg(long, global = true, env = "APPPROXY_LOG_RETENTION_REVISIONS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_retention_revisions: Option<u64>,
    /// Change-log rows younger than this are kept too [default: 1h].
    #[arg(long, global = true, env = "APPPROXY_LOG_RETENTION", value_parser = humantime::parse_duration)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option",
        default
    )]
    pub log_retention: Option<Duration>,
    /// How often the change log is compacted [default: 1m].
    #[arg(long, global = true, env = "APPPROXY_COMPACTION_INTERVAL", value_parser = humantime::parse_duration)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option",
        default
    )]
    pub compaction_interval: Option<Duration>,
    /// A worker silent this long is Lost, e.g. "30s" [default: 30s].
    #[arg(long, global = true, env = "APPPROXY_HEARTBEAT_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option",
        default
    )]
    pub heartbeat_timeout: Option<Duration>,
    /// How long a Lost worker keeps its routes before they move [default: 10s].
    #[arg(long, global = true, env = "APPPROXY_FAILOVER_GRACE", value_parser = humantime::parse_duration)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option",
        default
    )]
    pub failover_grace: Option<Duration>,
    /// Routes moved (or collected) per transaction [default: 100].
    #[arg(long, global = true, env = "APPPROXY_FAILOVER_BATCH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover_batch: Option<u32>,
    /// How often the leader renews its leadership and others try to take it [default: 2s].
    #[arg(long, global = true, env = "APPPROXY_LEADER_RENEW_INTERVAL", value_parser = humantime::parse_duration)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option",
        default
    )]
    pub leader_renew_interval: Option<Duration>,
    /// Refused credentials a client address may present per minute (a burst
    /// of as many, then one every 60s/N); beyond it the address gets 429 for
    /// a while. 0 turns the limit off [default: 30].
    #[arg(long, global = true, env = "APPPROXY_AUTH_FAILURES_PER_MINUTE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_failures_per_minute: Option<u32>,
    /// Collect routes nobody created or re-sent (PUT) for this long, e.g. "24h" [default: never].
    #[arg(long, global = true, env = "APPPROXY_ROUTE_IDLE_TTL", value_parser = humantime::parse_duration)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option",
        default
    )]
    pub route_idle_ttl: Option<Duration>,

    // ---- Kubernetes mode (src/k8s) ------------------------------------------
    /// Kubernetes mode: Lease election, AppProxyRoute mirror, worker-pod health
    /// [default: on when running in a cluster]. `--kubernetes=false` forces it off.
    #[arg(
        long,
        global = true,
        env = "APPPROXY_KUBERNETES",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<bool>,
    /// Namespace of the AppProxyRoutes, the Lease and the worker pods [default: $POD_NAMESPACE, else "default"].
    #[arg(long, global = true, env = "APPPROXY_NAMESPACE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Label selector of the worker pods [default: app.kubernetes.io/component=appproxy-worker].
    #[arg(long, global = true, env = "APPPROXY_WORKER_SELECTOR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_selector: Option<String>,
    /// Name of the leader-election Lease [default: appproxy-coordinator].
    #[arg(long, global = true, env = "APPPROXY_LEASE_NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_name: Option<String>,

    // ---- Backend.AI drop-in (src/backendai) -----------------------------------
    /// Backend.AI `api_secret` (what the Manager and the workers send as
    /// X-BackendAI-Token); setting it (or its file) turns Backend.AI mode on.
    #[arg(
        long,
        global = true,
        env = "APPPROXY_BACKENDAI_API_SECRET",
        hide_env_values = true
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backendai_api_secret: Option<String>,
    /// File holding the Backend.AI api_secret.
    #[arg(long, global = true, env = "APPPROXY_BACKENDAI_API_SECRET_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backendai_api_secret_file: Option<PathBuf>,
    /// Backend.AI `jwt_secret`: signs the setup and endpoint tokens the workers check.
    #[arg(
        long,
        global = true,
        env = "APPPROXY_BACKENDAI_JWT_SECRET",
        hide_env_values = true
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backendai_jwt_secret: Option<String>,
    /// File holding the Backend.AI jwt_secret.
    #[arg(long, global = true, env = "APPPROXY_BACKENDAI_JWT_SECRET_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backendai_jwt_secret_file: Option<PathBuf>,
    /// redis://… of the Backend.AI event bus (required in Backend.AI mode,
    /// unless --redis-sentinel is given), or a Sentinel setup's
    /// redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]…]/SERVICE_NAME[/DB][?sentinel_password=…]
    /// (rediss+sentinel:// for TLS).
    #[arg(
        long,
        global = true,
        env = "APPPROXY_REDIS_URL",
        hide_env_values = true
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// Comma-separated HOST:PORT of the Redis Sentinels that monitor the
    /// event bus's Redis (with --redis-service-name; --redis-url, if given,
    /// then supplies only the password, database and TLS, as upstream's
    /// `sentinel` setting).
    #[arg(
        long,
        global = true,
        env = "APPPROXY_REDIS_SENTINEL",
        value_delimiter = ',',
        requires = "redis_service_name"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_sentinel: Option<Vec<String>>,
    /// The service (master) name the sentinels of --redis-sentinel monitor.
    #[arg(
        long,
        global = true,
        env = "APPPROXY_REDIS_SERVICE_NAME",
        requires = "redis_sentinel"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_service_name: Option<String>,
    /// PEM file of the CA that signed the Redis server's certificate, for
    /// rediss:// URLs [default: the public roots (webpki-roots)].
    #[arg(long, global = true, env = "APPPROXY_REDIS_CA_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_ca_file: Option<PathBuf>,
    /// PEM client certificate for a Redis server that requires one (mutual
    /// TLS, rediss:// URLs; with --redis-client-key).
    #[arg(
        long,
        global = true,
        env = "APPPROXY_REDIS_CLIENT_CERT",
        requires = "redis_client_key"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_client_cert: Option<PathBuf>,
    /// PEM private key of --redis-client-cert.
    #[arg(
        long,
        global = true,
        env = "APPPROXY_REDIS_CLIENT_KEY",
        requires = "redis_client_cert"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_client_key: Option<PathBuf>,
    /// Comma-separated CIDRs from which `POST /v2/conf` needs no token (the
    /// Manager sends none) [default: none].
    #[arg(
        long,
        global = true,
        env = "APPPROXY_BACKENDAI_CONF_ALLOWED_NETWORKS",
        value_delimiter = ','
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backendai_conf_allowed_networks: Option<Vec<ipnet::IpNet>>,
    /// How long a create waits for the Backend.AI worker's acknowledgement [default: 15s].
    #[arg(long, global = true, env = "APPPROXY_BACKENDAI_ACK_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option",
        default
    )]
    pub backendai_ack_timeout: Option<Duration>,
    /// Interactive http routes of Backend.AI unused this long are collected [default: 1h].
    #[arg(long, global = true, env = "APPPROXY_BACKENDAI_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option",
        default
    )]
    pub backendai_idle_timeout: Option<Duration>,
    /// How long a Backend.AI conf token (`POST /v2/conf`) stays usable; it is
    /// deleted after [default: 10m].
    #[arg(long, global = true, env = "APPPROXY_BACKENDAI_CONF_TOKEN_TTL", value_parser = humantime::parse_duration)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option",
        default
    )]
    pub backendai_conf_token_ttl: Option<Duration>,
    /// Every live circuit's state and every recent removal is sent again to
    /// Backend.AI workers once per this period, spread evenly (0 turns the
    /// sweep off) [default: 5m].
    #[arg(long, global = true, env = "APPPROXY_BACKENDAI_RESYNC_PERIOD", value_parser = humantime::parse_duration)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option",
        default
    )]
    pub backendai_resync_period: Option<Duration>,
    /// redis://… of the Backend.AI Manager's core event bus (stream `events`,
    /// where it announces `session_terminated`), when it is not the App
    /// Proxy's Redis [default: --redis-url with DB 4].
    #[arg(
        long,
        global = true,
        env = "APPPROXY_BACKENDAI_CORE_REDIS_URL",
        hide_env_values = true
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backendai_core_redis_url: Option<String>,
    /// Comma-separated HOST:PORT of the Redis Sentinels of the Manager's
    /// core bus (with --backendai-core-redis-service-name; as --redis-sentinel).
    #[arg(
        long,
        global = true,
        env = "APPPROXY_BACKENDAI_CORE_REDIS_SENTINEL",
        value_delimiter = ',',
        requires = "backendai_core_redis_service_name"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backendai_core_redis_sentinel: Option<Vec<String>>,
    /// The service name of --backendai-core-redis-sentinel.
    #[arg(
        long,
        global = true,
        env = "APPPROXY_BACKENDAI_CORE_REDIS_SERVICE_NAME",
        requires = "backendai_core_redis_sentinel"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backendai_core_redis_service_name: Option<String>,
    /// HOST:PORT under which the coordinator registers itself in Backend.AI's
    /// Redis service discovery (group `appproxy-coordinator`, read by the
    /// Manager's Prometheus HTTP-SD), as upstream's `announce_addr`
    /// [default: not registered].
    #[arg(long, global = true, env = "APPPROXY_ANNOUNCE_ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_addr: Option<String>,
    /// How often the service discovery record is refreshed; it expires after
    /// three times this [default: 1m].
    #[arg(long, global = true, env = "APPPROXY_ANNOUNCE_INTERVAL", value_parser = humantime::parse_duration)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option",
        default
    )]
    pub announce_interval: Option<Duration>,
    /// A core bus entry left unacknowledged this long by a replica (one that
    /// died while handling it) is claimed by another [default: 5m].
    #[arg(long, global = true, env = "APPPROXY_BACKENDAI_CORE_CLAIM_IDLE", value_parser = humantime::parse_duration)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option",
        default
    )]
    pub backendai_core_claim_idle: Option<Duration>,
    /// The coordinator's own URL as clients reach it (Backend.AI `/status`)
    /// [default: http(s)://<bind address>].
    #[arg(long, global = true, env = "APPPROXY_ADVERTISED_URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertised_url: Option<String>,
    /// This replica's own URL as the other replicas of one installation reach
    /// it (its pod's address): while it leads, they send it their route
    /// creates, so one writer commits them all [default: http(s)://<bind
    /// address> when that names a host; with 0.0.0.0 or ::, none: the other
    /// replicas commit their own creates].
    #[arg(long, global = true, env = "APPPROXY_PEER_URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_url: Option<String>,
}
