//! Typed configuration: defaults, then a TOML file (`--config`), then
//! `APPPROXY_*` environment variables, then flags — later sources win.
//!
//! Environment variables are read by clap as the fallback of each flag, so
//! `--help` lists them next to the flag they stand for.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use clap::{Args, Parser, Subcommand, ValueEnum};
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize, Serializer};

pub use crate::secret::{BackendAiSecrets, Secret, Tokens, redacted_url};

/// Command line of `appproxy-coordinator`.
#[derive(Debug, Parser)]
#[command(name = "appproxy-coordinator", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub options: Options,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Run the coordinator (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Print the effective configuration (secrets redacted) and exit.
    Config,
    /// Print the AppProxyRoute CustomResourceDefinition (YAML) and exit.
    Crdgen,
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
    /// redis://… of the Backend.AI event bus (required in Backend.AI mode).
    #[arg(
        long,
        global = true,
        env = "APPPROXY_REDIS_URL",
        hide_env_values = true
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
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
    /// The coordinator's own URL as clients reach it (Backend.AI `/status`)
    /// [default: http(s)://<bind address>].
    #[arg(long, global = true, env = "APPPROXY_ADVERTISED_URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertised_url: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The default label selector of worker pods.
pub const DEFAULT_WORKER_SELECTOR: &str = "app.kubernetes.io/component=appproxy-worker";
/// The default name of the leader-election Lease.
pub const DEFAULT_LEASE_NAME: &str = "appproxy-coordinator";

/// The effective configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub bind: SocketAddr,
    #[serde(serialize_with = "redact_url")]
    pub database_url: Option<String>,
    pub data_dir: PathBuf,
    pub manager_token: Option<Secret>,
    pub manager_token_file: Option<PathBuf>,
    pub worker_token: Option<Secret>,
    pub worker_token_file: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub log_format: LogFormat,
    /// Where spans are exported (OTLP over HTTP); `None`: nowhere.
    #[serde(serialize_with = "redact_url")]
    pub otlp_endpoint: Option<String>,
    pub no_migrate: bool,
    pub max_body_bytes: usize,
    pub max_connections: u32,
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub bookmark_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    pub log_retention_revisions: u64,
    #[serde(with = "humantime_serde")]
    pub log_retention: Duration,
    #[serde(with = "humantime_serde")]
    pub compaction_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub failover_grace: Duration,
    pub failover_batch: u32,
    #[serde(with = "humantime_serde")]
    pub leader_renew_interval: Duration,
    #[serde(with = "humantime_serde::option")]
    pub route_idle_ttl: Option<Duration>,
    pub auth_failures_per_minute: u32,
    /// Kubernetes mode; `None` detects a cluster.
    pub kubernetes: Option<bool>,
    pub namespace: Option<String>,
    pub worker_selector: String,
    pub lease_name: String,
    pub backendai_api_secret: Option<Secret>,
    pub backendai_api_secret_file: Option<PathBuf>,
    pub backendai_jwt_secret: Option<Secret>,
    pub backendai_jwt_secret_file: Option<PathBuf>,
    #[serde(serialize_with = "redact_url")]
    pub redis_url: Option<String>,
    /// TLS to Redis (rediss://): the CA, and a client certificate and key.
    pub redis_ca_file: Option<PathBuf>,
    pub redis_client_cert: Option<PathBuf>,
    pub redis_client_key: Option<PathBuf>,
    pub backendai_conf_allowed_networks: Vec<ipnet::IpNet>,
    #[serde(with = "humantime_serde")]
    pub backendai_ack_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub backendai_idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub backendai_conf_token_ttl: Duration,
    pub advertised_url: Option<String>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            bind: SocketAddr::from(([127, 0, 0, 1], 6030)),
            database_url: None,
            data_dir: PathBuf::from("data"),
            manager_token: None,
            manager_token_file: None,
            worker_token: None,
            worker_token_file: None,
            tls_cert: None,
            tls_key: None,
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            no_migrate: false,
            max_body_bytes: 1024 * 1024,
            max_connections: 16,
            shutdown_timeout: Duration::from_secs(10),
            bookmark_interval: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(15),
            poll_interval: Duration::from_secs(1),
            log_retention_revisions: 100_000,
            log_retention: Duration::from_secs(3600),
            compaction_interval: Duration::from_secs(60),
            heartbeat_timeout: Duration::from_secs(30),
            failover_grace: Duration::from_secs(10),
            failover_batch: 100,
            leader_renew_interval: Duration::from_secs(2),
            route_idle_ttl: None,
            auth_failures_per_minute: 30,
            kubernetes: None,
            namespace: None,
            worker_selector: DEFAULT_WORKER_SELECTOR.to_owned(),
            lease_name: DEFAULT_LEASE_NAME.to_owned(),
            backendai_api_secret: None,
            backendai_api_secret_file: None,
            backendai_jwt_secret: None,
            backendai_jwt_secret_file: None,
            redis_url: None,
            redis_ca_file: None,
            redis_client_cert: None,
            redis_client_key: None,
            backendai_conf_allowed_networks: Vec::new(),
            backendai_ack_timeout: Duration::from_secs(15),
            backendai_idle_timeout: Duration::from_secs(3600),
            backendai_conf_token_ttl: Duration::from_secs(600),
            advertised_url: None,
        }
    }
}

/// Hides the password of a database URL.
fn redact_url<S: Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match url {
        None => s.serialize_none(),
        Some(u) => s.serialize_str(&redacted_url(u)),
    }
}

impl Config {
    /// Merges defaults, the config file, then environment and flags.
    pub fn load(options: &Options) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &options.config {
            anyhow::ensure!(
                path.is_file(),
                "config file {} does not exist",
                path.display()
            );
            figment = figment.merge(Toml::file(path));
        }
        let mut config: Config = figment
            .merge(Serialized::defaults(options))
            .extract()
            .context("invalid configuration")?;
        // An empty value (a chart's unset `otlpEndpoint`) means off.
        config.otlp_endpoint = config.otlp_endpoint.filter(|u| !u.trim().is_empty());
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.tls_cert.is_some() == self.tls_key.is_some(),
            "tls_cert and tls_key must be given together"
        );
        anyhow::ensure!(
            self.max_body_bytes >= 1024,
            "max_body_bytes must be at least 1024"
        );
        anyhow::ensure!(
            self.max_connections >= 1,
            "max_connections must be at least 1"
        );
        if let Some(url) = &self.otlp_endpoint {
            anyhow::ensure!(
                url.starts_with("http://") || url.starts_with("https://"),
                "otlp_endpoint must be an http:// or https:// URL (an OTLP/HTTP collector, \
                 e.g. http://otel-collector:4318), not {}",
                redacted_url(url)
            );
        }
        Ok(())
    }

    /// The configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// Where the embedded database lives when no URL is configured.
    pub fn sqlite_path(&self) -> PathBuf {
        self.data_dir.join("coordinator.db")
    }
}

/// Resolves the manager and worker bootstrap tokens: the value, else the
/// `*_file`, else a token generated once into the data directory (mode 0600).
/// Logs the path of any generated file, never a token.
pub fn resolve_tokens(config: &Config) -> anyhow::Result<Tokens> {
    let resolve = |value: &Option<Secret>,
                   file: &Option<PathBuf>,
                   name: &str|
     -> anyhow::Result<Secret> {
        if let Some(v) = value {
            anyhow::ensure!(!v.expose().trim().is_empty(), "{name} token is empty");
            return Ok(v.clone());
        }
        if let Some(path) = file {
            return read_token(path);
        }
        let path = config.data_dir.join(format!("{name}.token"));
        if path.exists() {
            return read_token(&path);
        }
        generate_token(&path)?;
        tracing::warn!(path = %path.display(), "no {name} token configured; generated one (read it from this file)");
        read_token(&path)
    };
    let tokens = Tokens {
        manager: resolve(&config.manager_token, &config.manager_token_file, "manager")?,
        worker: resolve(&config.worker_token, &config.worker_token_file, "worker")?,
    };
    check_secrets(&tokens, None)?;
    Ok(tokens)
}

/// The secret-carrying flags among `args` (the process's command line):
/// anyone on the host can read them in `ps`, unlike a file or the
/// environment.
pub fn secrets_on_command_line(args: impl IntoIterator<Item = String>) -> Vec<&'static str> {
    const FLAGS: [&str; 4] = [
        "--manager-token",
        "--worker-token",
        "--backendai-api-secret",
        "--backendai-jwt-secret",
    ];
    let args: Vec<String> = args.into_iter().collect();
    FLAGS
        .into_iter()
        .filter(|flag| {
            args.iter()
                .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
        })
        .collect()
}

/// The Backend.AI secrets, when Backend.AI mode is on (an api_secret is
/// configured): each from its value, else its file. The jwt_secret and a
/// Redis URL are then required. Both are held to the native tokens' rules
/// ([`MIN_TOKEN_LEN`]), and the four secrets (`tokens` too) must differ
/// pairwise: an api_secret equal to the jwt_secret would make every setup
/// token handed to a browser a Manager credential.
pub fn resolve_backendai(
    config: &Config,
    tokens: &Tokens,
) -> anyhow::Result<Option<BackendAiSecrets>> {
    let read = |value: &Option<Secret>, file: &Option<PathBuf>| -> anyhow::Result<Option<Secret>> {
        match (value, file) {
            (Some(v), _) => Ok(Some(v.clone())),
            (None, Some(path)) => read_token(path).map(Some),
            (None, None) => Ok(None),
        }
    };
    let Some(api_secret) = read(
        &config.backendai_api_secret,
        &config.backendai_api_secret_file,
    )?
    else {
        return Ok(None);
    };
    let jwt_secret = read(&config.backendai_jwt_secret, &config.backendai_jwt_secret_file)?
        .context("Backend.AI mode (an api_secret is set) needs backendai_jwt_secret (APPPROXY_BACKENDAI_JWT_SECRET)")?;
    anyhow::ensure!(
        config.redis_url.is_some(),
        "Backend.AI mode (an api_secret is set) needs redis_url (APPPROXY_REDIS_URL): its workers learn their routes over Redis"
    );
    let secrets = BackendAiSecrets {
        api_secret,
        jwt_secret,
    };
    check_secrets(tokens, Some(&secrets))?;
    Ok(Some(secrets))
}

/// Every configured secret with the setting that holds it.
fn named_secrets<'a>(
    tokens: &'a Tokens,
    backendai: Option<&'a BackendAiSecrets>,
) -> Vec<(&'static str, &'a Secret)> {
    let mut all = vec![
        ("manager_token (APPPROXY_MANAGER_TOKEN)", &tokens.manager),
        ("worker_token (APPPROXY_WORKER_TOKEN)", &tokens.worker),
    ];
    if let Some(b) = backendai {
        all.push((
            "backendai_api_secret (APPPROXY_BACKENDAI_API_SECRET)",
            &b.api_secret,
        ));
        all.push((
            "backendai_jwt_secret (APPPROXY_BACKENDAI_JWT_SECRET)",
            &b.jwt_secret,
        ));
    }
    all
}

/// Refuses secrets that would make authentication meaningless: any shorter
/// than [`MIN_TOKEN_LEN`], and any two equal (the holder of one would hold
/// the other's powers too). Each error names the settings involved.
pub fn check_secrets(tokens: &Tokens, backendai: Option<&BackendAiSecrets>) -> anyhow::Result<()> {
    let all = named_secrets(tokens, backendai);
    for (name, secret) in &all {
        let len = secret.expose().trim().chars().count();
        anyhow::ensure!(
            len >= MIN_TOKEN_LEN,
            "{name} is {len} characters long; use at least {MIN_TOKEN_LEN} \
             (e.g. `openssl rand -base64 32`)"
        );
    }
    for (i, (a, x)) in all.iter().enumerate() {
        for (b, y) in &all[i + 1..] {
            anyhow::ensure!(
                x != y,
                "{a} equals {b}: every secret must be different (whoever holds one would \
                 also have the other's rights)"
            );
        }
    }
    Ok(())
}

/// Shortest token accepted: a guessable token is no authentication.
pub const MIN_TOKEN_LEN: usize = 16;

fn read_token(path: &Path) -> anyhow::Result<Secret> {
    let raw = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read token file {}", path.display()))?;
    let token = raw.trim();
    anyhow::ensure!(!token.is_empty(), "token file {} is empty", path.display());
    Ok(Secret::new(token))
}

fn generate_token(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    let bytes: [u8; 32] = rand::random();
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create token file {}", path.display()))?;
    writeln!(file, "{token}")?;
    file.sync_all()?;
    Ok(())
}

/// Creates the data directory (mode 0700) if it is missing.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_secrets_are_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "bind = \"0.0.0.0:7000\"\nmanager_token = \"file-secret\"\n\
             database_url = \"postgres://app:pw@db/appproxy\"\nshutdown_timeout = \"3s\"\n",
        )
        .unwrap();
        let options = Options {
            config: Some(file),
            bind: Some("127.0.0.1:7001".parse().unwrap()),
            ..Options::default()
        };
        let c = Config::load(&options).unwrap();
        assert_eq!(c.bind.port(), 7001);
        assert_eq!(c.manager_token.as_ref().unwrap().expose(), "file-secret");
        assert_eq!(c.shutdown_timeout, Duration::from_secs(3));
        let shown = c.to_redacted_toml();
        assert!(!shown.contains("file-secret"), "{shown}");
        assert!(!shown.contains(":pw@"), "{shown}");
        assert!(
            shown.contains("postgres://app:<redacted>@db/appproxy"),
            "{shown}"
        );
    }

    #[test]
    fn typos_in_the_file_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "bnid = \"0.0.0.0:7000\"\n").unwrap();
        let options = Options {
            config: Some(file),
            ..Options::default()
        };
        let err = format!("{:#}", Config::load(&options).unwrap_err());
        assert!(err.contains("bnid"), "{err}");
    }

    #[test]
    fn generated_tokens_are_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        let first = resolve_tokens(&config).unwrap();
        let second = resolve_tokens(&config).unwrap();
        assert_eq!(first.manager, second.manager);
        assert_ne!(first.manager, first.worker);
        let mode = std::fs::metadata(dir.path().join("data/manager.token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn short_or_shared_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let with = |manager: &str, worker: &str| Config {
            data_dir: dir.path().to_owned(),
            manager_token: Some(Secret::new(manager)),
            worker_token: Some(Secret::new(worker)),
            ..Config::default()
        };
        let long = "0123456789abcdef-manager";
        let err = resolve_tokens(&with("short", "0123456789abcdef-worker")).unwrap_err();
        assert!(
            err.to_string()
                .contains("manager_token (APPPROXY_MANAGER_TOKEN) is 5 characters"),
            "{err}"
        );
        let err = resolve_tokens(&with(long, long)).unwrap_err();
        assert!(
            err.to_string().contains(
                "manager_token (APPPROXY_MANAGER_TOKEN) equals worker_token (APPPROXY_WORKER_TOKEN)"
            ),
            "{err}"
        );
        resolve_tokens(&with(long, "0123456789abcdef-worker")).unwrap();
    }

    #[test]
    fn backendai_secrets_follow_the_token_rules_and_differ_from_every_other_secret() {
        let tokens = Tokens {
            manager: Secret::new("0123456789abcdef-manager"),
            worker: Secret::new("0123456789abcdef-worker"),
        };
        let with = |api: &str, jwt: &str| Config {
            backendai_api_secret: Some(Secret::new(api)),
            backendai_jwt_secret: Some(Secret::new(jwt)),
            redis_url: Some("redis://127.0.0.1:6379".into()),
            ..Config::default()
        };
        let refused = |api: &str, jwt: &str| {
            resolve_backendai(&with(api, jwt), &tokens)
                .unwrap_err()
                .to_string()
        };
        let api = "0123456789abcdef-api-secret";
        let jwt = "0123456789abcdef-jwt-secret";
        assert!(
            refused("a", jwt)
                .contains("backendai_api_secret (APPPROXY_BACKENDAI_API_SECRET) is 1 characters"),
            "{}",
            refused("a", jwt)
        );
        assert!(refused(api, "short-jwt").contains("backendai_jwt_secret"));
        assert!(refused(api, api).contains(
            "backendai_api_secret (APPPROXY_BACKENDAI_API_SECRET) equals backendai_jwt_secret"
        ));
        assert!(refused("0123456789abcdef-manager", jwt).contains("manager_token"));
        assert!(refused(api, "0123456789abcdef-worker").contains("worker_token"));
        let secrets = resolve_backendai(&with(api, jwt), &tokens)
            .unwrap()
            .unwrap();
        assert_eq!(secrets.api_secret.expose(), api);
        assert!(
            resolve_backendai(&Config::default(), &tokens)
                .unwrap()
                .is_none()
        );
    }

    /// Every `[default: …]` in `--help` says what `Config::default` holds:
    /// the value itself where there is one, words for a setting that is off
    /// or derived at start (its field is empty then).
    #[test]
    fn help_defaults_are_config_defaults() {
        use clap::CommandFactory;
        let defaults = serde_json::to_value(Config::default()).unwrap();
        let mut checked = 0;
        for arg in Cli::command().get_arguments() {
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let Some(said) = help
                .split_once("[default: ")
                .and_then(|(_, rest)| rest.rsplit_once(']'))
                .map(|(said, _)| said)
            else {
                continue;
            };
            let id = arg.get_id().as_str();
            let value = defaults
                .get(id)
                .unwrap_or_else(|| panic!("--{id} says [default: {said}] but Config has no {id}"));
            let held = match value {
                serde_json::Value::Null => None,
                serde_json::Value::Array(a) if a.is_empty() => None,
                serde_json::Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            };
            match held {
                Some(held) => assert_eq!(
                    said.trim_start_matches("./"),
                    held,
                    "--{id}: the help says {said:?}, Config::default holds {held:?}"
                ),
                None => assert!(
                    !said.chars().next().is_some_and(|c| c.is_ascii_digit()),
                    "--{id} names a value ({said}) but Config::default holds none"
                ),
            }
            checked += 1;
        }
        assert!(checked >= 25, "only {checked} defaults found in --help");
    }

    #[test]
    fn token_flags_on_the_command_line_are_found() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            secrets_on_command_line(args(&["x", "--manager-token", "t", "--worker-token=u"])),
            vec!["--manager-token", "--worker-token"]
        );
        assert!(secrets_on_command_line(args(&["x", "--manager-token-file", "f"])).is_empty());
    }

    #[test]
    fn an_empty_otlp_endpoint_is_off_and_a_bad_one_refused() {
        let with = |url: &str| {
            Config::load(&Options {
                otlp_endpoint: Some(url.to_owned()),
                ..Options::default()
            })
        };
        assert_eq!(with("").unwrap().otlp_endpoint, None);
        assert_eq!(
            with("http://collector:4318")
                .unwrap()
                .otlp_endpoint
                .as_deref(),
            Some("http://collector:4318")
        );
        let err = format!("{:#}", with("collector:4318").unwrap_err());
        assert!(err.contains("otlp_endpoint must be an http://"), "{err}");
    }
}
