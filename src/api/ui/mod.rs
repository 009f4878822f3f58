//! The status page at `/ui`: read-only, for the manager token or the viewer
//! token. The page and its script and style are built into the binary; the
//! script logs in with a form post that answers an HttpOnly session cookie
//! (`session`), then reads `/ui/state` and follows `/ui/events` (server-sent
//! events, one stream per open page, fed by `crate::status::Board`).
//!
//! Not in the OpenAPI document: these are a page and its own session, not
//! the API (`openapi::tests` holds that to [`PATHS`]). No token ever goes in
//! a URL, and nothing here changes anything but the caller's own cookie.

pub mod session;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, FromRequest, FromRequestParts, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::request::Parts;
use axum::http::{HeaderName, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::Stream;

use super::AppState;
use super::auth::{Caller, identify_token};
use super::error::ApiError;
use crate::status::Board;

/// Every path the page serves (none is in the OpenAPI document).
pub const PATHS: [&str; 8] = [
    "/ui",
    "/ui/session",
    "/ui/app.js",
    "/ui/app.css",
    "/ui/login",
    "/ui/logout",
    "/ui/state",
    "/ui/events",
];

/// The least time between two states sent on one stream: a burst of
/// changes becomes one update.
const MIN_GAP: Duration = Duration::from_millis(300);

/// What the page needs besides the API's state.
pub struct Ui {
    pub board: Board,
    /// Served over TLS: the cookie is `Secure`.
    pub secure: bool,
}

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");

/// No inline script or style, nothing from elsewhere, never framed (the
/// one `data:` image is the empty icon, so the browser asks for no
/// `/favicon.ico`).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// The page's routes; each answers 404 while the page is off (no [`Ui`]).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(index))
        .route("/ui/app.js", get(script))
        .route("/ui/app.css", get(style))
        .route("/ui/login", post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/session", get(whoami))
        .route("/ui/state", get(state_json))
        .route("/ui/events", get(events))
}

fn ui(state: &AppState) -> Result<&Arc<Ui>, ApiError> {
    state
        .ui
        .as_ref()
        .ok_or_else(|| ApiError::not_found("the status page is off (--ui=false)"))
}

/// Headers every answer of the page carries.
fn guarded(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn asset(state: &AppState, content_type: &'static str, body: &'static str) -> Response {
    match ui(state) {
        Ok(_) => guarded(([(header::CONTENT_TYPE, content_type)], body).into_response()),
        Err(e) => e.into_response(),
    }
}

async fn index(State(state): State<AppState>) -> Response {
    asset(&state, "text/html; charset=utf-8", INDEX)
}

async fn script(State(state): State<AppState>) -> Response {
    asset(&state, "text/javascript; charset=utf-8", SCRIPT)
}

async fn style(State(state): State<AppState>) -> Response {
    asset(&state, "text/css; charset=utf-8", STYLE)
}

/// Someone allowed to see the page: a session cookie, or the manager or
/// viewer token as a bearer token.
pub struct PageViewer;

impl FromRequestParts<AppState> for PageViewer {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        ui(state)?;
        if parts.headers.contains_key(header::AUTHORIZATION) {
            return match super::auth::authenticate(parts, state).await? {
                Caller::Manager | Caller::Viewer => Ok(PageViewer),
                _ => Err(ApiError::forbidden(
                    "the status page needs the manager or the viewer token",
                )),
            };
        }
        let Some(cookie) = session::from_headers(&parts.headers) else {
            return Err(ApiError::unauthorized("log in at /ui"));
        };
        let peer = super::peer(parts);
        state.admit("native", peer, ApiError::too_many_attempts)?;
        match session::verify(&state.tokens, cookie, state.clock.now().timestamp()) {
            Some(_) => Ok(PageViewer),
            None => Err(state.refused(
                "native",
                peer,
                ApiError::unauthorized("the session has expired or is not valid; log in at /ui"),
                ApiError::too_many_attempts,
            )),
        }
    }
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

/// Refuses a cross-site post: a browser sends `Origin` with every POST, and
/// it must name this host.
fn same_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest);
    match (origin_host, host) {
        (Some(o), Some(h)) if o.eq_ignore_ascii_case(h) => Ok(()),
        _ => Err(ApiError::forbidden("a login from another site is refused")),
    }
}

/// `POST /ui/login` (form field `token`): the manager or viewer token opens
/// a session (204 and the cookie); anything else changes nothing.
async fn login(
    State(state): State<AppState>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let ui = ui(&state)?;
    let (parts, body) = request.into_parts();
    same_origin(&parts.headers)?;
    let peer = super::peer(&parts);
    let form: Result<Form<LoginForm>, FormRejection> =
        Form::from_request(axum::extract::Request::from_parts(parts, body), &state).await;
    let Form(form) =
        form.map_err(|e| ApiError::invalid(format!("send the form field token: {e}")))?;
    let token = form.token.trim();
    if token.is_empty() {
        return Err(ApiError::invalid("the token is empty"));
    }
    state.admit("native", peer, ApiError::too_many_attempts)?;
    let kind = match identify_token(token, &state).await {
        Ok(Caller::Manager) => session::Kind::Manager,
        Ok(Caller::Viewer) => session::Kind::Viewer,
        Ok(_) => {
            return Err(ApiError::forbidden(
                "the status page needs the manager or the viewer token",
            ));
        }
        Err(e) if e.status == StatusCode::UNAUTHORIZED => {
            return Err(state.refused("native", peer, e, ApiError::too_many_attempts));
        }
        Err(e) => return Err(e),
    };
    let expires = state.clock.now().timestamp() + session::TTL_SECONDS;
    let value = session::issue(&state.tokens, kind, expires).expect("the token just matched");
    let cookie = session::set_cookie(&value, session::TTL_SECONDS, ui.secure);
    Ok(guarded(
        (StatusCode::NO_CONTENT, [(header::SET_COOKIE, cookie)]).into_response(),
    ))
}

/// `GET /ui/session`: whether the caller's cookie is a session, and whose
/// (`{"session": "manager" | "viewer" | null}`), so the page knows whether
/// to show its login form without a failed request. A cookie that is not a
/// session counts as a refused credential, as anywhere else.
async fn whoami(
    State(state): State<AppState>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    ui(&state)?;
    let (parts, _) = request.into_parts();
    let session = match session::from_headers(&parts.headers) {
        None => None,
        Some(cookie) => {
            let peer = super::peer(&parts);
            state.admit("native", peer, ApiError::too_many_attempts)?;
            let kind = session::verify(&state.tokens, cookie, state.clock.now().timestamp());
            if kind.is_none() {
                // Counted; the answer stays "no session" unless over the limit.
                state.refused::<Result<(), ApiError>>("native", peer, Ok(()), |wait| {
                    Err(ApiError::too_many_attempts(wait))
                })?;
            }
            kind
        }
    };
    let name = session.map(|k| match k {
        session::Kind::Manager => "manager",
        session::Kind::Viewer => "viewer",
    });
    Ok(guarded(
        axum::Json(serde_json::json!({ "session": name })).into_response(),
    ))
}

/// `POST /ui/logout`: drops the cookie (which is all a session is).
async fn logout(State(state): State<AppState>) -> Result<Response, ApiError> {
    let ui = ui(&state)?;
    let cookie = session::set_cookie("", 0, ui.secure);
    Ok(guarded(
        (StatusCode::NO_CONTENT, [(header::SET_COOKIE, cookie)]).into_response(),
    ))
}

/// `GET /ui/state`: what the page shows, as JSON.
async fn state_json(State(state): State<AppState>, _: PageViewer) -> Result<Response, ApiError> {
    let json = ui(&state)?.board.state_json().await?;
    Ok(guarded(
        (
            [(header::CONTENT_TYPE, "application/json")],
            json.as_str().to_owned(),
        )
            .into_response(),
    ))
}

/// `GET /ui/events`: the state at once, then again whenever it changes
/// (at most every [`MIN_GAP`]), as `state` events; ends at shutdown.
async fn events(State(state): State<AppState>, _: PageViewer) -> Result<Response, ApiError> {
    let board = ui(&state)?.board.clone();
    let stream = states(board, state.hub.stopped());
    let sse = Sse::new(stream).keep_alive(KeepAlive::new().interval(state.keep_alive));
    let mut response = guarded(sse.into_response());
    response.headers_mut().insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    Ok(response)
}

fn states(
    board: Board,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl Stream<Item = Result<Event, std::convert::Infallible>> + Send + 'static {
    let mut changed = board.changed();
    async_stream::stream! {
        tokio::pin!(stopped);
        loop {
            changed.borrow_and_update();
            let sent = tokio::time::Instant::now();
            match board.state_json().await {
                Ok(json) => yield Ok(Event::default().event("state").data(json.as_str())),
                Err(e) => {
                    tracing::warn!(error = %e, "status page: cannot read the state");
                    yield Ok(Event::default().event("unavailable").data("{}"));
                }
            }
            tokio::select! {
                changed = changed.changed() => if changed.is_err() { break },
                () = &mut stopped => break,
            }
            tokio::select! {
                () = tokio::time::sleep_until(sent + MIN_GAP) => {}
                () = &mut stopped => break,
            }
        }
    }
}
