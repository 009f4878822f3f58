//! Startup and shutdown: open the store, resolve tokens, serve HTTP or HTTPS
//! until SIGTERM or Ctrl-C, then drain connections.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum_server::Handle;
use axum_server::tls_rustls::RustlsConfig;

use crate::api::{self, AppState};
use crate::clock::Clock;
use crate::config::{self, Config};
use crate::health;
use crate::hub::{self, Hub};
use crate::leader::{self, AdvisoryLock, Leadership};
use crate::store::{Db, Store};
use crate::telemetry::Metrics;

/// Selects the TLS implementation (ring) for the server and HTTP clients.
/// Call once at start; later calls are no-ops.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Opens the configured database: PostgreSQL if a URL is set, else the
/// embedded SQLite file in the data directory.
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
    Ok(store)
}

/// Applies migrations, naming the database in the error.
pub async fn migrate(store: &Store) -> anyhow::Result<()> {
    store
        .migrate()
        .await
        .with_context(|| format!("cannot migrate the {} database", store.backend()))
}

/// Runs the coordinator until a shutdown signal.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let store = open_store(&config).await?;
    if config.no_migrate {
        tracing::info!("not applying migrations (no_migrate)");
    } else {
        migrate(&store).await?;
    }
    let tokens = config::resolve_tokens(&config)?;
    let clock = Clock::system();
    let metrics = Metrics::new(&store);
    let hub = Hub::start(store.clone(), config.hub(), metrics.clone());
    // Kubernetes mode (src/k8s): a Lease elects the leader, which also runs
    // the AppProxyRoute mirror and the worker-pod watcher. Otherwise the
    // PostgreSQL advisory lock (or, with SQLite, the one process) leads.
    let (k8s_stop, k8s_stopped) = tokio::sync::watch::channel(false);
    let kubernetes = match crate::k8s::Settings::from_config(&config) {
        Some(settings) => {
            let client = crate::k8s::client()
                .await
                .context("Kubernetes mode is on, but no cluster configuration was found")?;
            tracing::info!(namespace = %settings.namespace, identity = %settings.identity, "Kubernetes mode");
            let mut stopped = k8s_stopped;
            let shutdown = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            Some(crate::k8s::start(
                client,
                settings,
                hub.clone(),
                clock.clone(),
                shutdown,
            ))
        }
        None => None,
    };
    let leadership = match &kubernetes {
        Some(k8s) => k8s.leadership.clone(),
        None => elect_leader(&store, &config, hub.stopped()),
    };
    tokio::spawn(hub::compact_periodically(
        hub.clone(),
        leadership.clone(),
        config.compaction_interval,
        config.log_retention_revisions,
        config.log_retention,
        clock.clone(),
    ));
    tokio::spawn(health::run(
        store.clone(),
        metrics.clone(),
        leadership,
        config.health(),
        clock.clone(),
        hub.shutdown_signal(),
    ));
    let state = AppState {
        store: store.clone(),
        hub: hub.clone(),
        tokens: Arc::new(tokens),
        metrics,
        keep_alive: config.keepalive_interval,
        batch_size: config.failover_batch,
        clock,
    };
    let app = api::router(state, config.max_body_bytes);

    let handle = Handle::new();
    tokio::spawn(shutdown_on_signal(
        handle.clone(),
        hub,
        config.shutdown_timeout,
    ));
    let served = {
        let listening = handle.clone();
        let backend = store.backend();
        tokio::spawn(async move {
            if let Some(addr) = listening.listening().await {
                announce(addr, backend);
            }
        });
        let service = app.into_make_service();
        match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => {
                let tls = RustlsConfig::from_pem_file(cert, key)
                    .await
                    .context("cannot load the TLS certificate and key")?;
                axum_server::bind_rustls(config.bind, tls)
                    .handle(handle)
                    .serve(service)
                    .await
            }
            _ => {
                axum_server::bind(config.bind)
                    .handle(handle)
                    .serve(service)
                    .await
            }
        }
    };
    served.with_context(|| format!("cannot serve on {}", config.bind))?;
    if let Some(k8s) = kubernetes {
        k8s_stop.send_replace(true);
        k8s.released(std::time::Duration::from_secs(5)).await;
    }
    store.close().await;
    tracing::info!("stopped");
    Ok(())
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
