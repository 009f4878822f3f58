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

use std::time::Duration;

use ipnet::IpNet;

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
    /// Fails only on a malformed Redis URL; nothing connects yet.
    pub fn new(settings: Settings) -> anyhow::Result<BackendAi> {
        let redis = redis::Client::open(settings.redis_url.as_str())
            .map_err(|e| anyhow::anyhow!("invalid redis_url: {e}"))?;
        Ok(BackendAi {
            settings,
            acks: Acks::default(),
            redis,
        })
    }
}
