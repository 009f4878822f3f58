//! `appproxy-coordinator`: command-line wiring only.

use appproxy_coordinator::config::{self, Cli, Command, Config, LogFormat};
use appproxy_coordinator::store::ImportMode;
use appproxy_coordinator::{server, telemetry};
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    appproxy_coordinator::install_crypto_provider();
    let cli = Cli::parse();
    if cli.command == Some(Command::Crdgen) {
        // Needs no configuration: the CRD is generated from the Rust type.
        print!("{}", appproxy_coordinator::k8s::crd::crd_yaml());
        return std::process::ExitCode::SUCCESS;
    }
    let config = match Config::load(&cli.options) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let telemetry = match telemetry::init_tracing(
        config.log_format == LogFormat::Json,
        config.otlp_endpoint.as_deref(),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Some(endpoint) = &config.otlp_endpoint {
        tracing::info!(
            endpoint = %config::redacted_url(endpoint),
            "exporting spans over OTLP"
        );
    }
    for flag in config::secrets_on_command_line(std::env::args()) {
        tracing::warn!(
            flag,
            "a token was given on the command line, where every user of this host can read it \
             (ps, /proc); use the *_FILE setting or the environment variable instead"
        );
    }
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => server::serve(config).await,
        Command::Migrate => migrate(&config).await,
        Command::ImportBackendai(flags) => import_backendai(&config, &flags).await,
        Command::ExportBackendai(flags) => export_backendai(&config, &flags).await,
        Command::Config => {
            print!("{}", config.to_redacted_toml());
            Ok(())
        }
        Command::Crdgen => unreachable!("handled before loading the configuration"),
    };
    // Sends the spans still queued (blocking, so off the async workers).
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn migrate(config: &Config) -> anyhow::Result<()> {
    let store = server::open_store(config).await?;
    server::migrate(&store).await?;
    tracing::info!(database = store.backend(), "migrations applied");
    store.close().await;
    Ok(())
}

async fn import_backendai(config: &Config, flags: &config::ImportFlags) -> anyhow::Result<()> {
    let store = server::open_store(config).await?;
    server::migrate(&store).await?;
    let mode = ImportMode {
        dry_run: flags.dry_run,
        merge: flags.merge,
    };
    let result = appproxy_coordinator::takeover::import_backendai(
        &store,
        &flags.from,
        mode,
        chrono::Utc::now(),
        &mut std::io::stdout(),
    )
    .await;
    store.close().await;
    result.map(drop)
}

async fn export_backendai(config: &Config, flags: &config::ExportFlags) -> anyhow::Result<()> {
    let store = server::open_store(config).await?;
    server::migrate(&store).await?;
    let result = appproxy_coordinator::takeover::export::export_backendai(
        &store,
        &flags.to,
        flags.dry_run,
        chrono::Utc::now(),
        config.backendai_conf_token_ttl,
        &mut std::io::stdout(),
    )
    .await;
    store.close().await;
    result.map(drop)
}
