//! Startup and shutdown: open the store, resolve tokens, turn the
//! configuration into each subsystem's settings, serve HTTP or HTTPS until
//! SIGTERM or Ctrl-C, then drain connections.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum_server::Handle;
use axum_server::accept::NoDelayAcceptor;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};

use crate::api::{self, AppState};
use crate::backendai::{self, BackendAi};
use crate::clock::Clock;
use crate::config::{self, Config};
use crate::health::{self, HealthConfig};
use crate::hub::{self, Hub, HubConfig};
use crate::leader::{self, AdvisoryLock, Leadership};
use crate::store::{Db, Store};
use crate::telemetry::Metrics;

/// Opens the configured database: PostgreSQL if a URL is set, else the
/// embedded SQLite file in the data directory. PostgreSQL is reached once
/// here, so that a refused certificate stops the start with a clear error
/// and an unencrypted connection over the network is said in the log.
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let store = match &config.database_url {
        Some(url) => Store::connect(url, config.max_connections).await,
        None => {
            config::create_private_dir(&config.data_dir)?;
            Store::open_sqlite_file(&config.sqlite_path(), config.max_connections).await
        }
    };
    let store = store.with_context(|| match &config.database_url {
        Some(url) => format!("cannot open database {}", config::redacted_url(url)),
        None => format!("cannot open {}", config.sqlite_path().display()),
    })?;
    if let Some(url) = &config.database_url {
        check_transport(&store, url, config.no_migrate).await?;
    }
    Ok(store)
}

/// Connects to PostgreSQL once: fails on a TLS problem (naming the URL,
/// password redacted) and warns when the connection crosses a network
/// unencrypted. A server that cannot be reached fails the start too, as
/// the migrations would, unless they are not applied here (`no_migrate`):
/// then the check is made once the server answers.
async fn check_transport(store: &Store, url: &str, no_migrate: bool) -> anyhow::Result<()> {
    let database = config::redacted_url(url);
    match store.transport().await {
        Ok(transport) => {
            warn_if_plaintext(transport.as_ref(), &database);
            Ok(())
        }
        Err(e) => {
            let tls = crate::tls::explain(&e, "sslrootcert");
            if tls.is_none() && no_migrate {
                tracing::warn!(error = %e, %database, "cannot reach the database yet; serving anyway (no_migrate)");
                let store = store.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                        if let Ok(transport) = store.transport().await {
                            warn_if_plaintext(transport.as_ref(), &database);
                            return;
                        }
                    }
                });
                return Ok(());
            }
            // Its Display already holds its causes: no chain to repeat them.
            let e = anyhow::anyhow!("{e}");
            let e = match tls {
                Some(explanation) => e.context(explanation),
                None => e,
            };
            Err(e.context(format!("cannot connect to the database {database}")))
        }
    }
}

/// One warning when PostgreSQL is reached over a network without TLS.
fn warn_if_plaintext(transport: Option<&crate::store::Transport>, database: &str) {
    let Some(t) = transport else { return };
    if t.plaintext_over_network() {
        tracing::warn!(
            %database,
            host = %t.host,
            sslmode = t.ssl_mode,
            "the connection to PostgreSQL is not encrypted: routes, kernel addresses and tokens \
             cross the network in plain text. To require TLS, add \
             sslmode=verify-full&sslrootcert=<CA file> to the database URL"
        );
    } else {
        tracing::debug!(host = %t.host, encrypted = t.encrypted, sslmode = t.ssl_mode, "connected to PostgreSQL");
    }
}

/// Applies migrations, naming the database in the error.
pub async fn migrate(store: &Store) -> anyhow::Result<()> {
    store
        .migrate()
        .await
        .with_context(|| format!("cannot migrate the {} database", store.backend()))
}

/// How often an open status page is refreshed with what the change log does
/// not carry (acknowledgements, heartbeats).
const UI_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the coordinator until a shutdown signal.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let store = open_store(&config).await?;
    if config.no_migrate {
        tracing::info!("not applying migrations (no_migrate)");
    } else {
        migrate(&store).await?;
    }
    let tokens = config::resolve_tokens(&config)?;
    // With PostgreSQL, a replica that does not lead sends its route creates
    // to the leader's writer (src/store/create_writer/forward.rs).
    store.forward_creates(peers(&config, &tokens)?);
    let backendai = match config::resolve_backendai(&config, &tokens)? {
        Some(secrets) => Some(Arc::new(BackendAi::new(backendai_settings(
            &config, secrets,
        ))?)),
        None => None,
    };
    anyhow::ensure!(
        config.announce_addr.is_none() || backendai.is_some(),
        "announce_addr (APPPROXY_ANNOUNCE_ADDR) registers the coordinator in Backend.AI's Redis \
         service discovery, which needs Backend.AI mode (backendai_api_secret and redis_url)"
    );
    let clock = Clock::system();
    let metrics = Metrics::new(&store);
    let hub = Hub::start(store.clone(), hub_settings(&config), metrics.clone());
    // The status page (/ui): its read model follows the hub on every replica.
    let board = config
        .ui
        .then(|| crate::status::Board::start(&hub, UI_REFRESH));
    // Kubernetes mode (src/k8s): a Lease elects the leader, which also runs
    // the AppProxyRoute mirror and the worker-pod watcher. Otherwise the
    // PostgreSQL advisory lock (or, with SQLite, the one process) leads.
    let (k8s_stop, k8s_stopped) = tokio::sync::watch::channel(false);
    let kubernetes = start_kubernetes(&config, board.clone(), &hub, &clock, k8s_stopped).await?;
    let leadership = match &kubernetes {
        Some(k8s) => k8s.leadership.clone(),
        None => elect_leader(&store, &config, hub.stopped()),
    };
    let ctx = hub.context(clock.clone(), leadership.clone());
    tokio::spawn(hub::compact_periodically(
        ctx.clone(),
        config.compaction_interval,
        config.log_retention_revisions,
        config.log_retention,
    ));
    let discovery = match &backendai {
        Some(bai) => start_backendai(&config, bai, &ctx)?,
        None => None,
    };
    tokio::spawn(health::run(ctx, health_settings(&config)));
    let ui = board.map(|board| {
        Arc::new(api::ui::Ui {
            board,
            secure: config.tls_cert.is_some(),
        })
    });
    let state = AppState {
        store: store.clone(),
        hub: hub.clone(),
        tokens: Arc::new(tokens),
        metrics,
        keep_alive: config.keepalive_interval,
        batch_size: config.failover_batch,
        auth_limit: Arc::new(api::limit::AuthLimiter::new(
            config.auth_failures_per_minute,
            clock.clone(),
        )),
        clock,
        backendai,
        ui,
    };
    let app = api::router(state, config.max_body_bytes);

    let handle = Handle::new();
    tokio::spawn(follow_leader(&config, &handle, &store, leadership, &hub));
    tokio::spawn(shutdown_on_signal(
        handle.clone(),
        hub,
        config.shutdown_timeout,
    ));
    let served = listen(&config, app, handle, store.backend()).await;
    if let Some(discovery) = discovery {
        // The record goes before the process does (it expires otherwise).
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), discovery).await;
    }
    served.with_context(|| format!("cannot serve on {}", config.bind))?;
    if let Some(k8s) = kubernetes {
        k8s_stop.send_replace(true);
        k8s.released(std::time::Duration::from_secs(5)).await;
    }
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Serves `app` on the configured address (HTTPS with the configured
/// certificate) until `handle` shuts it down; logs the address once bound.
async fn listen(
    config: &Config,
    app: axum::Router,
    handle: Handle,
    backend: &'static str,
) -> std::io::Result<()> {
    let listening = handle.clone();
    tokio::spawn(async move {
        if let Some(addr) = listening.listening().await {
            announce(addr, backend);
        }
    });
    // Peer addresses: `POST /v2/conf` admits allowed networks without a
    // token, and failed authentications are counted per address.
    // TCP_NODELAY: a stream's events are small writes; without it the last
    // of a burst waits for the client's delayed ACK (~40 ms).
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = RustlsConfig::from_pem_file(cert, key).await.map_err(|e| {
                std::io::Error::other(format!("cannot load the TLS certificate and key: {e}"))
            })?;
            let tls = RustlsAcceptor::new(tls).acceptor(NoDelayAcceptor::new());
            axum_server::bind(config.bind)
                .acceptor(tls)
                .handle(handle)
                .serve(service)
                .await
        }
        _ => {
            axum_server::bind(config.bind)
                .acceptor(NoDelayAcceptor::new())
                .handle(handle)
                .serve(service)
                .await
        }
    }
}

/// How this replica sends its creates to the leader: with the manager token
/// (the same on every replica), trusting the certificates of `tls_cert`
/// besides the platform's for a leader serving HTTPS.
fn peers(config: &Config, tokens: &crate::secret::Tokens) -> anyhow::Result<crate::store::Peers> {
    let roots = match &config.tls_cert {
        Some(path) => {
            let pem = std::fs::read(path)
                .with_context(|| format!("cannot read the TLS certificate {}", path.display()))?;
            reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("cannot read the TLS certificate {}", path.display()))?
        }
        None => Vec::new(),
    };
    crate::store::Peers::new(tokens.manager.clone(), config.max_body_bytes, roots)
        .context("cannot set up the HTTP client for the other replicas")
}

/// Once the listener is bound: keeps track of who leads, writing this
/// replica's URL ([`Config::peer_url`]) while it does (until the hub stops).
fn follow_leader(
    config: &Config,
    handle: &Handle,
    store: &Store,
    leadership: Leadership,
    hub: &Hub,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let (handle, store, stopped) = (handle.clone(), store.clone(), hub.stopped());
    let config = config.clone();
    async move {
        let Some(bound) = handle.listening().await else {
            return;
        };
        let own_url = config.peer_url(bound);
        crate::store::follow_leader(store, own_url, move || leadership.is_leader(), stopped).await;
    }
}

/// Backend.AI mode's settings, when it is on (`secrets` resolved by
/// [`config::resolve_backendai`]).
pub fn backendai_settings(
    config: &Config,
    secrets: config::BackendAiSecrets,
) -> backendai::Settings {
    let scheme = if config.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    backendai::Settings {
        secrets,
        conf_allowed_networks: config.backendai_conf_allowed_networks.clone(),
        ack_timeout: config.backendai_ack_timeout,
        idle_timeout: config.backendai_idle_timeout,
        conf_token_ttl: config.backendai_conf_token_ttl,
        advertised_url: config
            .advertised_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{}", config.bind))
            .trim_end_matches('/')
            .to_owned(),
        redis_url: config.redis_bus_url().ok().flatten().unwrap_or_default(),
        redis_tls: backendai::RedisTls {
            ca_file: config.redis_ca_file.clone(),
            client_cert: config.redis_client_cert.clone(),
            client_key: config.redis_client_key.clone(),
        },
    }
}

/// Registers this coordinator in Backend.AI's service discovery (DB 0 of
/// the Manager's Redis, as upstream) under `addr` until shutdown.
/// Kubernetes mode, when configured: the Lease, the AppProxyRoute mirror
/// (reporting its repairs to the status page's `board`) and the worker-pod
/// watcher, until `stopped` says so.
async fn start_kubernetes(
    config: &Config,
    board: Option<crate::status::Board>,
    hub: &Hub,
    clock: &Clock,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Option<crate::k8s::Running>> {
    let Some(mut settings) = kubernetes_settings(config) else {
        return Ok(None);
    };
    settings.mirror.repairs = board;
    let client = crate::k8s::client()
        .await
        .context("Kubernetes mode is on, but no cluster configuration was found")?;
    tracing::info!(namespace = %settings.namespace, identity = %settings.identity, "Kubernetes mode");
    let shutdown = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    Ok(Some(crate::k8s::start(
        client,
        settings,
        hub.clone(),
        clock.clone(),
        shutdown,
    )))
}

/// The Backend.AI side: the event bus (acknowledgements on every replica,
/// the publisher and idle collection on the leader), the Manager's core bus
/// (`session_terminated`, on every replica) and, with `announce_addr`, the
/// service discovery record (its task answered, to be awaited at shutdown).
fn start_backendai(
    config: &Config,
    bai: &Arc<BackendAi>,
    ctx: &crate::leader::Context,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let bus = backendai::bus::BusConfig {
        sweep_period: config.backendai_resync_period,
        ..backendai::bus::BusConfig::default()
    };
    backendai::bus::spawn(ctx.clone(), bai.clone(), bus);
    backendai::sessions::spawn(ctx.clone(), bai.clone(), sessions_settings(config))?;
    config
        .announce_addr
        .as_deref()
        .map(|addr| spawn_discovery(config, bai, addr, ctx))
        .transpose()
}

fn spawn_discovery(
    config: &Config,
    bai: &BackendAi,
    addr: &str,
    ctx: &crate::leader::Context,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use backendai::discovery::{self, Announcement, DiscoveryConfig};
    let (core, _) =
        backendai::sessions::core_redis(bai, sessions_settings(config).core_redis_url.as_deref())?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let announcement = Announcement::new(
        addr,
        &discovery::instance_name(),
        config.tls_cert.is_some(),
        now,
    )
    .map_err(|e| anyhow::anyhow!("announce_addr (APPPROXY_ANNOUNCE_ADDR) {addr:?}: {e}"))?;
    Ok(discovery::spawn(
        core.with_db(discovery::DB),
        announcement,
        DiscoveryConfig::every(config.announce_interval),
        ctx.shutdown.clone(),
    ))
}

/// The session consumer's settings (Backend.AI mode).
pub fn sessions_settings(config: &Config) -> backendai::sessions::SessionsConfig {
    backendai::sessions::SessionsConfig {
        core_redis_url: config.core_redis_url().ok().flatten(),
        ..Default::default()
    }
    .with_claim_idle(config.backendai_core_claim_idle)
}

/// The hub's settings.
pub fn hub_settings(config: &Config) -> HubConfig {
    HubConfig {
        poll_interval: config.poll_interval,
        bookmark_interval: config.bookmark_interval,
        ..HubConfig::default()
    }
}

/// The health loops' settings.
pub fn health_settings(config: &Config) -> HealthConfig {
    HealthConfig {
        heartbeat_timeout: config.heartbeat_timeout,
        failover_grace: config.failover_grace,
        batch_size: config.failover_batch,
        route_idle_ttl: config.route_idle_ttl,
    }
}

/// Kubernetes settings when Kubernetes mode is on: forced by
/// `kubernetes = true`, or detected in a cluster (`KUBERNETES_SERVICE_HOST`)
/// unless `kubernetes = false`.
pub fn kubernetes_settings(config: &Config) -> Option<crate::k8s::Settings> {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    if !kubernetes_enabled(config.kubernetes, in_cluster) {
        return None;
    }
    let from_env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let namespace = config
        .namespace
        .clone()
        .or_else(|| from_env("POD_NAMESPACE"))
        .unwrap_or_else(|| "default".to_owned());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let identity = from_env("POD_NAME")
        .or_else(|| from_env("HOSTNAME"))
        .map_or_else(
            || format!("appproxy-coordinator-{suffix}"),
            |host| format!("{host}-{}", &suffix[..8]),
        );
    Some(crate::k8s::Settings::new(
        &namespace,
        &identity,
        &config.worker_selector,
        &config.lease_name,
    ))
}

/// Whether Kubernetes mode is on, given the `kubernetes` setting and whether
/// we run in a cluster.
fn kubernetes_enabled(setting: Option<bool>, in_cluster: bool) -> bool {
    setting.unwrap_or(in_cluster)
}

/// Who runs the singleton loops: with PostgreSQL, the replica holding the
/// advisory lock; with SQLite, the one process.
fn elect_leader(
    store: &Store,
    config: &Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Leadership {
    match store.db() {
        Db::Postgres(pool) => leader::spawn(
            AdvisoryLock::new(pool.clone()),
            config.leader_renew_interval,
            shutdown,
        ),
        Db::Sqlite(_) => leader::spawn(leader::Sole, config.leader_renew_interval, shutdown),
    }
}

fn announce(addr: SocketAddr, backend: &str) {
    tracing::info!(%addr, database = backend, "listening on {addr}");
}

async fn shutdown_on_signal(handle: Handle, hub: Hub, timeout: std::time::Duration) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!(timeout = ?timeout, "shutting down: no new connections, finishing open ones");
    // Streams end with a final bookmark, so their connections can close.
    hub.shutdown();
    handle.graceful_shutdown(Some(timeout));
}

#[cfg(test)]
mod tests {
    #[test]
    fn kubernetes_mode_is_detected_unless_switched_off() {
        assert!(super::kubernetes_enabled(None, true));
        assert!(!super::kubernetes_enabled(None, false));
        assert!(super::kubernetes_enabled(Some(true), false));
        assert!(!super::kubernetes_enabled(Some(false), true));
    }
}
