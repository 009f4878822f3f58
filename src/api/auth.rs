//! Bearer-token authentication and scopes.
//!
//! Four kinds of token: the manager token (routes, sessions, workers), the
//! worker bootstrap token (registration only), the viewer token (the status
//! page only, read-only; see `ui`), and per-worker tokens issued at
//! registration (that worker's own endpoints only). A per-worker token names its
//! worker (`apw.<id>.<secret>`); the store keeps only its SHA-256.

use axum::extract::{FromRequestParts, Path};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use base64::Engine;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::AppState;
use super::error::ApiError;

/// Who is calling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    Manager,
    Bootstrap,
    /// The viewer token: the status page and nothing else.
    Viewer,
    Worker(Uuid),
}

use crate::secret::sha256;

/// A fresh per-worker token and its hash.
pub fn issue_worker_token(worker_id: Uuid) -> (String, [u8; 32]) {
    let secret: [u8; 32] = rand::random();
    let token = format!(
        "apw.{}.{}",
        worker_id.simple(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let hash = sha256(&token);
    (token, hash)
}

/// Identifies the caller from `Authorization: Bearer …`. A request without
/// the header is refused without counting as an attempt; a credential that
/// is refused counts against the caller's address ([`super::limit`]), and an
/// address over its limit is answered 429 before its credential is looked at.
pub async fn authenticate(parts: &Parts, state: &AppState) -> Result<Caller, ApiError> {
    let header = parts
        .headers
        .get(AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("send Authorization: Bearer <token>"))?;
    let peer = super::peer(parts);
    state.admit("native", peer, ApiError::too_many_attempts)?;
    match identify(header, state).await {
        Err(e) if e.status == axum::http::StatusCode::UNAUTHORIZED => {
            Err(state.refused("native", peer, e, ApiError::too_many_attempts))
        }
        identified => identified,
    }
}

/// Who the bearer token in `header` belongs to.
async fn identify(header: &axum::http::HeaderValue, state: &AppState) -> Result<Caller, ApiError> {
    let token = header
        .to_str()
        .ok()
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::unauthorized("the Authorization header is not a bearer token"))?;
    identify_token(token, state).await
}

/// Who `token` belongs to; `unauthorized` when nobody.
pub(super) async fn identify_token(token: &str, state: &AppState) -> Result<Caller, ApiError> {
    if state.tokens.manager.matches(token) {
        return Ok(Caller::Manager);
    }
    if state.tokens.worker.matches(token) {
        return Ok(Caller::Bootstrap);
    }
    if state
        .tokens
        .viewer
        .as_ref()
        .is_some_and(|v| v.matches(token))
    {
        return Ok(Caller::Viewer);
    }
    if let Some(worker_id) = token
        .strip_prefix("apw.")
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(id, _)| Uuid::try_parse(id).ok())
    {
        let stored = state.store.worker_token_hash(worker_id).await?;
        if let Some(stored) = stored
            && bool::from(sha256(token).as_slice().ct_eq(stored.as_slice()))
        {
            return Ok(Caller::Worker(worker_id));
        }
    }
    Err(ApiError::unauthorized("the token is not valid"))
}

/// The manager token.
pub struct ManagerOnly;

impl FromRequestParts<AppState> for ManagerOnly {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match authenticate(parts, state).await? {
            Caller::Manager => Ok(ManagerOnly),
            _ => Err(ApiError::forbidden("this endpoint needs the manager token")),
        }
    }
}

/// Who may register: the worker bootstrap token (`None`), or a worker's own
/// token (`Some(id)`), with which a live worker re-registers itself.
pub struct Registrant(pub Option<Uuid>);

impl FromRequestParts<AppState> for Registrant {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match authenticate(parts, state).await? {
            Caller::Bootstrap => Ok(Registrant(None)),
            Caller::Worker(id) => Ok(Registrant(Some(id))),
            Caller::Manager | Caller::Viewer => Err(ApiError::forbidden(
                "registration needs the worker bootstrap token or the worker's own token",
            )),
        }
    }
}

/// The token of the worker named by the `{id}` path segment.
pub struct WorkerSelf(pub Uuid);

/// The manager token, or the token of the worker named by `{id}`.
pub struct WorkerSelfOrManager(pub Caller);

async fn path_worker(parts: &mut Parts, state: &AppState) -> Result<Uuid, ApiError> {
    let Path(id) = Path::<Uuid>::from_request_parts(parts, state).await?;
    Ok(id)
}

impl FromRequestParts<AppState> for WorkerSelf {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = authenticate(parts, state).await?;
        let id = path_worker(parts, state).await?;
        match caller {
            Caller::Worker(w) if w == id => Ok(WorkerSelf(id)),
            _ => Err(ApiError::forbidden(
                "this endpoint needs the token of the worker it names",
            )),
        }
    }
}

impl FromRequestParts<AppState> for WorkerSelfOrManager {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = authenticate(parts, state).await?;
        let id = path_worker(parts, state).await?;
        match caller {
            Caller::Manager => Ok(WorkerSelfOrManager(caller)),
            Caller::Worker(w) if w == id => Ok(WorkerSelfOrManager(caller)),
            _ => Err(ApiError::forbidden(
                "this endpoint needs the manager token or the token of the worker it names",
            )),
        }
    }
}

/// Any valid token (the handler decides what it may see).
pub struct AnyCaller(pub Caller);

impl FromRequestParts<AppState> for AnyCaller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        authenticate(parts, state).await.map(AnyCaller)
    }
}
