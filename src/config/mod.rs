//! Typed configuration: defaults, then a TOML file (`--config`), then
//! `APPPROXY_*` environment variables, then flags — later sources win.
//!
//! Environment variables are read by clap as the fallback of each flag, so
//! `--help` lists them next to the flag they stand for.

mod flags;
mod secrets;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::ValueEnum;
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize, Serializer};

pub use self::flags::{Cli, Command, ExportFlags, ImportFlags, Options};
pub use self::secrets::{
    MIN_TOKEN_LEN, check_secrets, create_private_dir, resolve_backendai, resolve_tokens,
    secrets_on_command_line,
};
pub use crate::secret::{BackendAiSecrets, Secret, Tokens, redacted_url};

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
    pub viewer_token: Option<Secret>,
    pub viewer_token_file: Option<PathBuf>,
    /// The status page at `/ui`.
    pub ui: bool,
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
    /// Sentinels of the bus's Redis (`HOST:PORT`), with `redis_service_name`.
    pub redis_sentinel: Vec<String>,
    pub redis_service_name: Option<String>,
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
    #[serde(with = "humantime_serde")]
    pub backendai_resync_period: Duration,
    /// The Manager's core bus; `None`: `redis_url` with DB 4.
    #[serde(serialize_with = "redact_url")]
    pub backendai_core_redis_url: Option<String>,
    pub backendai_core_redis_sentinel: Vec<String>,
    pub backendai_core_redis_service_name: Option<String>,
    #[serde(with = "humantime_serde")]
    pub backendai_core_claim_idle: Duration,
    pub advertised_url: Option<String>,
    /// This replica's own URL as the other replicas reach it; `None`: the
    /// bind address when it names one (see [`Config::peer_url`]).
    pub peer_url: Option<String>,
    /// `HOST:PORT` registered in Backend.AI's service discovery; `None`: not.
    pub announce_addr: Option<String>,
    #[serde(with = "humantime_serde")]
    pub announce_interval: Duration,
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
            viewer_token: None,
            viewer_token_file: None,
            ui: true,
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
            redis_sentinel: Vec::new(),
            redis_service_name: None,
            redis_ca_file: None,
            redis_client_cert: None,
            redis_client_key: None,
            backendai_conf_allowed_networks: Vec::new(),
            backendai_ack_timeout: Duration::from_secs(15),
            backendai_idle_timeout: Duration::from_secs(3600),
            backendai_conf_token_ttl: Duration::from_secs(600),
            backendai_resync_period: Duration::from_secs(300),
            backendai_core_redis_url: None,
            backendai_core_redis_sentinel: Vec::new(),
            backendai_core_redis_service_name: None,
            backendai_core_claim_idle: Duration::from_secs(300),
            advertised_url: None,
            peer_url: None,
            announce_addr: None,
            announce_interval: Duration::from_secs(60),
        }
    }
}

/// `url`, or the sentinel URL `sentinels` and `service_name` (named
/// `settings` in errors) make with `url`'s credentials, database and TLS.
fn combined_redis_url(
    url: Option<&str>,
    sentinels: &[String],
    service_name: Option<&str>,
    settings: &str,
) -> anyhow::Result<Option<String>> {
    match (sentinels.is_empty(), service_name) {
        (true, None) => Ok(url.map(str::to_owned)),
        (false, Some(name)) => crate::backendai::redis_target::sentinel_url(sentinels, name, url)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{settings}: {e:#}")),
        _ => anyhow::bail!("{settings} must be given together"),
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
        // And an empty Redis URL (the chart's Secret with Redis Sentinel set
        // separately) means none.
        config.redis_url = config.redis_url.filter(|u| !u.trim().is_empty());
        config.backendai_core_redis_url = config
            .backendai_core_redis_url
            .filter(|u| !u.trim().is_empty());
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
        self.redis_bus_url()?;
        self.core_redis_url()?;
        anyhow::ensure!(
            self.announce_interval >= Duration::from_secs(1),
            "announce_interval must be at least 1s"
        );
        if let Some(url) = &self.peer_url {
            let ok = reqwest::Url::parse(url).is_ok_and(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.host().is_some()
                    && u.path() == "/"
                    && u.query().is_none()
                    && u.username().is_empty()
            });
            anyhow::ensure!(
                ok,
                "peer_url (APPPROXY_PEER_URL) must be http(s)://HOST:PORT, the address the other \
                 replicas reach this one at (e.g. http://10.0.3.7:6030), not {url:?}"
            );
        }
        if let Some(addr) = &self.announce_addr {
            crate::backendai::discovery::host_port(addr).map_err(|e| {
                anyhow::anyhow!("announce_addr (APPPROXY_ANNOUNCE_ADDR) {addr:?}: {e}")
            })?;
        }
        Ok(())
    }

    /// Where the other replicas reach this one (to send it their route
    /// creates while it leads): `peer_url`, else `scheme://bound` when the
    /// bind address names a host (not 0.0.0.0 or ::); else `None`, and
    /// this replica takes no other's creates while it leads.
    pub fn peer_url(&self, bound: std::net::SocketAddr) -> Option<String> {
        if let Some(url) = &self.peer_url {
            return Some(url.trim_end_matches('/').to_owned());
        }
        let scheme = if self.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        (!bound.ip().is_unspecified()).then(|| format!("{scheme}://{bound}"))
    }

    /// The event bus's Redis URL: `redis_url`, or the sentinel URL
    /// `redis_sentinel` and `redis_service_name` make (with `redis_url`'s
    /// password, database and TLS).
    pub fn redis_bus_url(&self) -> anyhow::Result<Option<String>> {
        combined_redis_url(
            self.redis_url.as_deref(),
            &self.redis_sentinel,
            self.redis_service_name.as_deref(),
            "redis_sentinel (APPPROXY_REDIS_SENTINEL) and redis_service_name \
             (APPPROXY_REDIS_SERVICE_NAME)",
        )
    }

    /// The Manager's core bus URL, as [`Self::redis_bus_url`] from the
    /// `backendai_core_redis_*` settings; `None`: the bus's Redis, DB 4.
    pub fn core_redis_url(&self) -> anyhow::Result<Option<String>> {
        combined_redis_url(
            self.backendai_core_redis_url.as_deref(),
            &self.backendai_core_redis_sentinel,
            self.backendai_core_redis_service_name.as_deref(),
            "backendai_core_redis_sentinel (APPPROXY_BACKENDAI_CORE_REDIS_SENTINEL) and \
             backendai_core_redis_service_name (APPPROXY_BACKENDAI_CORE_REDIS_SERVICE_NAME)",
        )
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
        // The viewer token, when given, follows the same rules.
        let with_viewer = |viewer: &str| Config {
            viewer_token: Some(Secret::new(viewer)),
            ..with(long, "0123456789abcdef-worker")
        };
        let err = resolve_tokens(&with_viewer("short")).unwrap_err();
        assert!(
            err.to_string()
                .contains("viewer_token (APPPROXY_VIEWER_TOKEN) is 5 characters"),
            "{err}"
        );
        let err = resolve_tokens(&with_viewer(long)).unwrap_err();
        assert!(
            err.to_string().contains(
                "manager_token (APPPROXY_MANAGER_TOKEN) equals viewer_token (APPPROXY_VIEWER_TOKEN)"
            ),
            "{err}"
        );
        let tokens = resolve_tokens(&with_viewer("0123456789abcdef-viewer")).unwrap();
        assert_eq!(
            tokens.viewer.as_ref().map(|v| v.expose()),
            Some("0123456789abcdef-viewer")
        );
        assert!(
            resolve_tokens(&with(long, "0123456789abcdef-worker"))
                .unwrap()
                .viewer
                .is_none()
        );
    }

    #[test]
    fn backendai_secrets_follow_the_token_rules_and_differ_from_every_other_secret() {
        let tokens = Tokens {
            manager: Secret::new("0123456789abcdef-manager"),
            worker: Secret::new("0123456789abcdef-worker"),
            viewer: Some(Secret::new("0123456789abcdef-viewer")),
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
        assert!(refused(api, "0123456789abcdef-viewer").contains("viewer_token"));
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
    fn sentinel_settings_make_a_sentinel_url_and_a_bad_one_names_its_settings() {
        let mut c = Config {
            redis_url: Some("redis://:pw@ignored:6379/1".into()),
            redis_sentinel: vec!["s1:26379".into(), "s2".into()],
            redis_service_name: Some("mymaster".into()),
            ..Config::default()
        };
        c.check().unwrap();
        assert_eq!(
            c.redis_bus_url().unwrap().as_deref(),
            Some("redis+sentinel://:pw@s1:26379,s2/mymaster/1")
        );
        assert_eq!(c.core_redis_url().unwrap(), None);
        c.redis_service_name = None;
        let e = c.check().unwrap_err().to_string();
        assert!(
            e.contains("redis_sentinel (APPPROXY_REDIS_SENTINEL) and redis_service_name"),
            "{e}"
        );
        let c = Config {
            backendai_core_redis_sentinel: vec!["s1:x".into()],
            backendai_core_redis_service_name: Some("m".into()),
            ..Config::default()
        };
        let e = format!("{:#}", c.check().unwrap_err());
        assert!(e.contains("backendai_core_redis_sentinel"), "{e}");
        let c = Config {
            announce_addr: Some("10.0.0.5".into()),
            ..Config::default()
        };
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("announce_addr (APPPROXY_ANNOUNCE_ADDR)"), "{e}");
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
