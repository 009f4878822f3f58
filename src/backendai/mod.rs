//! The Backend.AI drop-in: the unmodified Backend.AI Manager and App Proxy
//! workers (26.9.x) work against this coordinator.
//!
//! There is no second model. A Backend.AI *circuit* is a route (its extra
//! fields in [`crate::domain::CircuitInfo`]), a Backend.AI worker is a worker
//! whose name is its `authority` (its extra fields in
//! [`crate::domain::BackendAiWorker`]); both are stored, placed, failed over,
//! watched and mirrored like any other. What lives here is translation, and
//! what each of upstream's calls does with our store.
//!
//! The shapes and rules (pure, no I/O):
//! - [`circuit`]: the circuit's wire shapes (`SerializableCircuit`,
//!   `RouteInfo`) made from routes, and URLs as upstream writes them;
//! - [`worker`]: the worker's: its registration turned into ours, the worker
//!   and its slots as upstream answers them;
//! - [`endpoint`]: inference endpoints: `existing_url` re-use, endpoint
//!   token claims;
//! - [`interactive`]: interactive apps: served protocols, client networks,
//!   setup token claims;
//! - [`jwt`]: HS256 tokens (setup and endpoint tokens the workers check).
//!
//! What the calls do (the use cases, each file named after the HTTP
//! handlers' file in `crate::api::backendai` that calls it; [`acks`] they
//! share), failing with [`Error`]:
//! - [`endpoints`]: the Manager's `/v2/endpoints`;
//! - [`proxy`]: the Manager's `/v2/conf` and the browser's `/v2/proxy/auth`;
//! - [`workers`]: the workers' `/api/worker` and `/api/slots`;
//! - [`circuits`]: the workers' `/api/circuit`, and the worker a circuit is
//!   on;
//! - [`acks`]: waiting for a worker's acknowledgement of a circuit.
//!
//! And what runs beside them:
//! - [`bus`]: the Redis event bus (envelopes, which change becomes which
//!   event, the acknowledgement listener), [`publish`] (the leader's
//!   publisher, fed from the change log) and [`idle`] (idle collection);
//! - [`sessions`]: the Manager's core bus (`session_terminated` removes the
//!   session's circuits), on every replica;
//! - [`live`]: what the workers keep in Redis DB 2 (last seen, per-circuit
//!   traffic), read and written for the worker API.
//!
//! The HTTP side (`/status`, `/health`, `/v2`, `/api`, `/v1`: routing,
//! upstream's authentication, request and answer bodies, error bodies) is
//! `crate::api::backendai`; nothing here knows HTTP.
//!
//! The mode is on when an api_secret is configured ([`Settings`]);
//! otherwise every Backend.AI path answers 404 and nothing here runs.

pub mod acks;
pub mod bus;
pub mod circuit;
pub mod circuits;
pub mod discovery;
pub mod endpoint;
pub mod endpoints;
mod error;
pub mod health_detail;
pub mod idle;
pub mod interactive;
pub mod jwt;
pub mod live;
pub mod proxy;
pub mod publish;
pub mod redis_target;
pub mod sessions;
pub mod worker;
pub mod workers;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ipnet::IpNet;
use redis::IntoConnectionInfo;

use crate::secret::{BackendAiSecrets, redacted_url};

pub use acks::Acks;
pub use error::Error;
pub use redis_target::RedisTarget;

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
    /// A conf token (`POST /v2/conf`) is usable this long, then deleted.
    pub conf_token_ttl: Duration,
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
            .field("conf_token_ttl", &self.conf_token_ttl)
            .field("advertised_url", &self.advertised_url)
            .field("redis_url", &redacted_url(&self.redis_url))
            .field("redis_tls", &self.redis_tls)
            .finish_non_exhaustive()
    }
}

/// What the Backend.AI handlers and loops share.
pub struct BackendAi {
    pub settings: Settings,
    /// Acknowledgements the workers sent, as this replica heard them.
    pub acks: Acks,
    /// The event bus's Redis (connections are opened by who needs one).
    pub redis: RedisTarget,
    /// Its DB 2 ([`live`]).
    pub live: RedisTarget,
    /// One multiplexed connection for short commands on the request path
    /// (health checks), opened on first use and replaced (through the
    /// sentinels, with Sentinel) when it breaks.
    commands: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    /// The last check of the dependencies, answered again for
    /// [`PROBE_CACHE`] (one check at a time: callers meanwhile wait for it).
    probed: tokio::sync::Mutex<Option<(tokio::time::Instant, Probe)>>,
}

/// How long a dependency check is answered again instead of repeated.
pub const PROBE_CACHE: Duration = Duration::from_secs(1);
/// How long a dependency may take to answer a check.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What a check of the database and Redis found: `None` when healthy, else
/// why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub database: Option<String>,
    pub redis: Option<String>,
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
        let redis = RedisTarget::open(
            &settings.redis_url,
            &settings.redis_tls,
            "redis_url (APPPROXY_REDIS_URL)",
        )?;
        Ok(BackendAi {
            settings,
            acks: Acks::default(),
            live: live::client(&redis),
            redis,
            commands: tokio::sync::Mutex::new(None),
            probed: tokio::sync::Mutex::new(None),
        })
    }

    /// Runs `cmd` on the shared command connection, opened if it is not
    /// yet; a broken one (or one to a server no longer the primary) is
    /// replaced and the command tried once more.
    async fn command<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(PROBE_TIMEOUT))
            .set_response_timeout(Some(PROBE_TIMEOUT));
        let mut tried = false;
        loop {
            let mut connection = {
                let mut shared = self.commands.lock().await;
                match shared.as_ref() {
                    Some(c) => c.clone(),
                    None => {
                        let c = self.redis.connect(&config, PROBE_TIMEOUT).await?;
                        *shared = Some(c.clone());
                        c
                    }
                }
            };
            match cmd.query_async::<T>(&mut connection).await {
                Err(e) if redis_target::must_reconnect(&e) => {
                    *self.commands.lock().await = None;
                    if tried {
                        return Err(e);
                    }
                    tried = true;
                }
                other => return other,
            }
        }
    }

    /// `PING` on the shared connection; a failed TLS handshake says so.
    async fn ping_redis(&self) -> Result<(), String> {
        self.command::<String>(&redis::cmd("PING"))
            .await
            .map(|_| ())
            .map_err(|e| redis_error(&e))
    }

    /// Worker `authority` fetched `circuits` (`GET /api/worker/{id}/circuits`,
    /// at its boot) and registers each: they count as delivered. Said on the
    /// bus in the worker's own words (an `added` event, as if it had
    /// acknowledged their created events), so whichever replica leads records
    /// it and the routes become `Active` without waiting for a re-publish. A
    /// failure to say it only leaves that to the next acknowledged re-publish.
    pub async fn fetched(&self, authority: &str, circuits: Vec<serde_json::Value>) {
        if circuits.is_empty() {
            return;
        }
        let payload = serde_json::json!({
            "target_worker_authority": authority, "circuits": circuits
        });
        let message = bus::Envelope::new(bus::ADDED, &payload).to_json();
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(bus::CHANNEL).arg(message);
        if let Err(e) = self.command::<i64>(&publish).await {
            tracing::warn!(worker = authority, error = %redis_error(&e), "Backend.AI bus: cannot record the circuits a worker fetched as delivered");
        }
    }

    /// The database (`ping`) and Redis, checked concurrently, each within
    /// [`PROBE_TIMEOUT`]; a check younger than [`PROBE_CACHE`] is answered
    /// again. However many callers ask at once, one check runs.
    pub async fn probe<F, E>(&self, database: F) -> Probe
    where
        F: std::future::Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let mut last = self.probed.lock().await;
        if let Some((at, probe)) = last.as_ref()
            && at.elapsed() < PROBE_CACHE
        {
            return probe.clone();
        }
        let (database, redis) = tokio::join!(timed(database), timed(self.ping_redis()));
        let probe = Probe { database, redis };
        *last = Some((tokio::time::Instant::now(), probe.clone()));
        probe
    }
}

/// `None` when `check` succeeds within [`PROBE_TIMEOUT`], else why not.
async fn timed<F, E>(check: F) -> Option<String>
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    match tokio::time::timeout(PROBE_TIMEOUT, check).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!("no answer within {PROBE_TIMEOUT:?}")),
    }
}

/// The event bus's Redis client, the one place one is built: `redis://` as
/// it is; `rediss://` verified against `tls.ca_file` (else the public
/// roots), with the client certificate if one is given, both read now.
/// Clients for another database derive from it ([`live::client`]) and keep
/// all of it. Errors never show the URL's password.
pub fn redis_client(url: &str, tls: &RedisTls) -> anyhow::Result<redis::Client> {
    let shown = redacted_url(url);
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
    let certificates = tls_certificates(tls)?.expect("some TLS file is set");
    redis::Client::build_with_tls(info, certificates)
        .map_err(|e| anyhow::anyhow!("cannot use the Redis TLS files: {e}"))
}

/// The CA and client certificate of `tls`, read now; `None` when no file
/// is set (the public roots, no client certificate).
pub(crate) fn tls_certificates(tls: &RedisTls) -> anyhow::Result<Option<redis::TlsCertificates>> {
    if !tls.is_set() {
        return Ok(None);
    }
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
    Ok(Some(redis::TlsCertificates {
        client_tls,
        root_cert,
    }))
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
