//! The secrets a coordinator starts with: the manager and worker bootstrap
//! tokens (configured, or generated once into the data directory) and, in
//! Backend.AI mode, the api_secret and jwt_secret; the rules they must meet.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine;

use super::Config;
use crate::secret::{BackendAiSecrets, Secret, Tokens};

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
    let viewer = match (&config.viewer_token, &config.viewer_token_file) {
        (Some(v), _) => Some(v.clone()),
        (None, Some(path)) => Some(read_token(path)?),
        (None, None) => None,
    };
    let tokens = Tokens {
        manager: resolve(&config.manager_token, &config.manager_token_file, "manager")?,
        worker: resolve(&config.worker_token, &config.worker_token_file, "worker")?,
        viewer,
    };
    check_secrets(&tokens, None)?;
    Ok(tokens)
}

/// The secret-carrying flags among `args` (the process's command line):
/// anyone on the host can read them in `ps`, unlike a file or the
/// environment.
pub fn secrets_on_command_line(args: impl IntoIterator<Item = String>) -> Vec<&'static str> {
    const FLAGS: [&str; 5] = [
        "--manager-token",
        "--worker-token",
        "--viewer-token",
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
        config.redis_bus_url()?.is_some(),
        "Backend.AI mode (an api_secret is set) needs redis_url (APPPROXY_REDIS_URL), or \
         redis_sentinel and redis_service_name: its workers learn their routes over Redis"
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
    if let Some(viewer) = &tokens.viewer {
        all.push(("viewer_token (APPPROXY_VIEWER_TOKEN)", viewer));
    }
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
