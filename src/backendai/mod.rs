//! The Backend.AI drop-in: the unmodified Backend.AI Manager and App Proxy
//! workers (26.9.x) work against this coordinator.
//!
//! There is no second model. A Backend.AI *circuit* is a route (its extra
//! fields in [`crate::domain::CircuitInfo`]), a Backend.AI worker is a worker
//! whose name is its `authority` (its extra fields in
//! [`crate::domain::BackendAiWorker`]); both are stored, placed, failed over,
//! watched and mirrored like any other. What lives here is translation:
//!
//! - [`circuit`]: the wire shapes (`SerializableCircuit`, `RouteInfo`, the
//!   worker registration) made from routes and workers, and URLs as
//!   upstream writes them;
//! - [`endpoint`]: inference endpoints: `existing_url` re-use, endpoint
//!   token claims;
//! - [`interactive`]: interactive apps: served protocols, client networks,
//!   setup token claims;
//! - [`jwt`]: HS256 tokens (setup and endpoint tokens the workers check);
//! - [`acks`]: waiting for a worker's acknowledgement of a circuit;
//! - [`bus`]: the Redis event bus (envelopes, which change becomes which
//!   event, the acknowledgement listener), [`publish`] (the leader's
//!   publisher, fed from the change log) and [`idle`] (idle collection);
//! - [`live`]: what the workers keep in Redis DB 2 (last seen, per-circuit
//!   traffic), read and written for the worker API.
//!
//! The HTTP side (`/status`, `/health`, `/v2`, `/api`, `/v1`, upstream's
//! authentication and error bodies) is `crate::api::backendai`.
//!
//! The mode is on when an api_secret is configured ([`Settings`]);
//! otherwise every Backend.AI path answers 404 and nothing here runs.

pub mod acks;
pub mod bus;
pub mod circuit;
pub mod endpoint;
pub mod idle;
pub mod interactive;
pub mod jwt;
pub mod live;
pub mod publish;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ipnet::IpNet;
use redis::IntoConnectionInfo;

use crate::config::{BackendAiSecrets, Config};

pub use acks::Acks;

/// Backend.AI mode's settings.
#[derive(Clone)]
pub struct Settings {
    pub secrets: BackendAiSecrets,
    /// Networks from which `POST /v2/conf` needs no token (the Manager
    /// sends none).
    pub conf_allowed_networks: Vec<IpNet>,
    /// How long a create waits for the worker's acknowledgement.
    pub ack_timeout: Duration,
    /// Interactive http circuits unused this long are collected.
    pub idle_timeout: Duration,
    /// What `GET /status` reports as `advertise_address`.
    pub advertised_url: String,
    pub redis_url: String,
    /// TLS to Redis (`rediss://`): the CA and the client certificate.
    pub redis_tls: RedisTls,
}

/// Files for TLS to Redis, used with `rediss://` URLs and read when the
/// client is built ([`redis_client`]), i.e. at start.
#[derive(Clone, Debug, Default)]
pub struct RedisTls {
    /// PEM certificate(s) of the CA the server's certificate must chain to;
    /// `None`: the public roots (webpki-roots).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for a server that requires one (with `client_key`).
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
}

impl RedisTls {
    fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.client_cert.is_some() || self.client_key.is_some()
    }
}

impl std::fmt::Debug for Settings {
    /// Secrets and the Redis password stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("conf_allowed_networks", &self.conf_allowed_networks)
            .field("ack_timeout", &self.ack_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("advertised_url", &self.advertised_url)
            .field("redis_url", &crate::config::redacted_url(&self.redis_url))
            .field("redis_tls", &self.redis_tls)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// The settings when Backend.AI mode is on (`secrets` resolved by
    /// [`crate::config::resolve_backendai`]).
    pub fn new(config: &Config, secrets: BackendAiSecrets) -> Settings {
        let scheme = if config.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        Settings {
            secrets,
            conf_allowed_networks: config.backendai_conf_allowed_networks.clone(),
            ack_timeout: config.backendai_ack_timeout,
            idle_timeout: config.backendai_idle_timeout,
            advertised_url: config
                .advertised_url
                .clone()
                .unwrap_or_else(|| format!("{scheme}://{}", config.bind))
                .trim_end_matches('/')
                .to_owned(),
            redis_url: config.redis_url.clone().unwrap_or_default(),
            redis_tls: RedisTls {
                ca_file: config.redis_ca_file.clone(),
                client_cert: config.redis_client_cert.clone(),
                client_key: config.redis_client_key.clone(),
            },
        }
    }
}

/// What the Backend.AI handlers and loops share.
pub struct BackendAi {
    pub settings: Settings,
    /// Acknowledgements the workers sent, as this replica heard them.
    pub acks: Acks,
    /// The event bus's Redis (connections are opened by who needs one).
    pub redis: redis::Client,
}

impl std::fmt::Debug for BackendAi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendAi")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl BackendAi {
    /// Fails on a malformed Redis URL or unusable TLS files; nothing
    /// connects yet.
    pub fn new(settings: Settings) -> anyhow::Result<BackendAi> {
        let redis = redis_client(&settings.redis_url, &settings.redis_tls)?;
        Ok(BackendAi {
            settings,
            acks: Acks::default(),
            redis,
        })
    }
}

/// The event bus's Redis client, the one place one is built: `redis://` as
/// it is; `rediss://` verified against `tls.ca_file` (else the public
/// roots), with the client certificate if one is given, both read now.
/// Clients for another database derive from it ([`live::client`]) and keep
/// all of it. Errors never show the URL's password.
pub fn redis_client(url: &str, tls: &RedisTls) -> anyhow::Result<redis::Client> {
    let shown = crate::config::redacted_url(url);
    let info = url
        .into_connection_info()
        .map_err(|e| anyhow::anyhow!("invalid redis_url {shown}: {e}"))?;
    // Without verification TLS stops no one in the middle; the redis crate
    // would refuse it only when connecting.
    anyhow::ensure!(
        !matches!(
            info.addr(),
            redis::ConnectionAddr::TcpTls { insecure: true, .. }
        ),
        "redis_url {shown} asks for TLS without certificate verification (#insecure), which \
         the coordinator does not do: give the server's CA in redis_ca_file instead"
    );
    if !tls.is_set() {
        return Ok(redis::Client::open(info)?);
    }
    anyhow::ensure!(
        matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }),
        "redis_ca_file, redis_client_cert and redis_client_key are for TLS, which needs a \
         rediss:// URL; redis_url is {shown}"
    );
    let root_cert = match &tls.ca_file {
        Some(path) => {
            let pem = read_pem(path, "redis_ca_file")?;
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            let certificates = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("redis_ca_file {} is not PEM", path.display()))?
                .len();
            anyhow::ensure!(
                certificates > 0,
                "redis_ca_file {} holds no PEM certificate",
                path.display()
            );
            Some(pem)
        }
        None => None,
    };
    let client_tls = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read_pem(cert, "redis_client_cert")?,
            client_key: read_pem(key, "redis_client_key")?,
        }),
        (None, None) => None,
        _ => anyhow::bail!("redis_client_cert and redis_client_key must be given together"),
    };
    redis::Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
    .map_err(|e| anyhow::anyhow!("cannot use the Redis TLS files: {e}"))
}

fn read_pem(path: &Path, setting: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {setting} {}", path.display()))
}

/// A Redis error as the log and `/health` show it: a failed TLS handshake
/// says what failed (certificate verification, a client certificate the
/// server wants) and which setting to check.
pub fn redis_error(error: &redis::RedisError) -> String {
    match crate::tls::explain(error, "redis_ca_file") {
        Some(explanation) => format!("{explanation} ({error})"),
        None => error.to_string(),
    }
}
