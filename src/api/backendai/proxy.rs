//! Interactive apps: `POST /v2/conf` (the Manager says where a session's
//! app listens and gets a conf token) and `GET /v2/proxy/auth` (the user's
//! browser trades it for the app's circuit and a setup token for the
//! worker). An app's circuit is the interactive route of (session, app);
//! what each call does is [`crate::backendai::proxy`].
//!
//! Where this differs from upstream 26.9.6:
//! - Token-less `POST /v2/conf` is accepted only from the networks in
//!   `conf_allowed_networks` (upstream: a switch for everyone); from
//!   elsewhere it takes the exact api_secret.
//!   The caller is checked before the body is read.
//! - A session has one circuit per app, and it belongs to the user it was
//!   opened for. A conf token of that same user may update it in place:
//!   upstream's `no_reuse`, or other access settings (`open_to_public`,
//!   `allowed_client_ips`), would create a second circuit for the app with
//!   the token's kernel address and access; here the existing one takes
//!   them (and is answered with `reuse: false`), which gives that user
//!   nothing a second circuit would not. A conf token of any other user
//!   for an existing app is refused (403) and changes nothing: the app's
//!   URL keeps its targets, its access and its user.
//! - `redirect` must be a path on the worker's origin (see
//!   [`redirect_path`]).
//! - Conf tokens expire `conf_token_ttl` after they were issued (upstream:
//!   never) and are deleted then; upstream's column sizes are enforced.
//! - Bad input (a non-UUID token, an unknown protocol, a bad CIDR) is a 400,
//!   never a 500 or status -1.

use aide::axum::ApiRouter;
use aide::axum::routing::{get_with, post_with};
use aide::transform::TransformOperation;
use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::auth::{ConfCaller, Mode};
use super::endpoints::{SessionConfig, TokenResponse};
use super::{BaiError, BaiJson, BaiPath, BaiQuery, validation_error};
use crate::api::AppState;
use crate::api::openapi::backendai::{operation, raises};
use crate::api::openapi::{json_response, respond, text_response};
use crate::backendai::interactive::{redirect_path, wants_json};
use crate::backendai::proxy::{self as apps, AppAddress, AppRequest};

type Op<'a> = TransformOperation<'a>;

/// Adds `/v2/conf` and `/v2/proxy` to `router`.
pub fn endpoints(router: ApiRouter<AppState>) -> ApiRouter<AppState> {
    router
        .api_route("/v2/conf", post_with(conf, conf_docs))
        .api_route("/v2/proxy/auth", get_with(auth, auth_docs))
        .api_route(
            "/v2/proxy/{token}/{session_id}/add",
            get_with(add, add_docs),
        )
}

/// `POST /v2/conf`.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct ConfRequest {
    #[serde(default)]
    pub login_session_token: Option<String>,
    pub kernel_host: String,
    pub kernel_port: u16,
    pub session: SessionConfig,
}

/// `GET /v2/proxy/auth` (and the optional parameters of `/add`).
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct ProxyQuery {
    /// The conf token.
    pub token: String,
    pub session_id: String,
    pub app: String,
    /// `http`, `grpc`, `h2`, `tcp`, `preopen`, `vnc` or `rdp`.
    pub protocol: String,
    /// Stored as the circuit's `arguments`.
    #[serde(default)]
    pub args: Option<String>,
    /// A boolean (`true`, `false`, `1`, `0`, …).
    #[serde(default)]
    pub open_to_public: Option<String>,
    /// Comma-separated CIDRs.
    #[serde(default)]
    pub allowed_client_ips: Option<String>,
    /// The path the worker redirects to after `/setup`.
    #[serde(default)]
    pub redirect: Option<String>,
    /// A boolean; here the session's circuit for the app is updated in
    /// place instead of a second one being created.
    #[serde(default)]
    pub no_reuse: Option<String>,
    /// The preferred frontend port.
    #[serde(default)]
    pub port: Option<String>,
    /// The preferred subdomain.
    #[serde(default)]
    pub subdomain: Option<String>,
}

#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct ProxyResponse {
    /// The worker's `/setup` with the setup token.
    pub redirect_url: String,
    /// The circuit existed with these settings (always false for tcp).
    pub reuse: bool,
}

#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
pub struct AddPath {
    pub token: Uuid,
    pub session_id: Uuid,
}

/// `GET /v2/proxy/{token}/{session_id}/add`.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
pub struct AddResponse {
    pub code: u16,
    /// This coordinator's `/v2/proxy/auth` with the parameters.
    pub url: String,
}

/// The two CORS headers upstream sets by hand on `/v2/proxy` answers.
fn with_cors(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("*"),
    );
    response
}

/// `POST /v2/conf`: who may call (before the body is read), then the body,
/// then the session.
async fn conf(
    State(state): State<AppState>,
    ConfCaller(bai): ConfCaller,
    BaiJson(request): BaiJson<ConfRequest>,
) -> Result<Json<TokenResponse>, BaiError> {
    let session = request.session;
    let app = AppAddress {
        login_session_token: request.login_session_token,
        kernel_host: request.kernel_host,
        kernel_port: request.kernel_port,
        session_id: session.id,
        user_uuid: session.user_uuid,
        project_id: session.project_id,
        access_key: session.access_key,
        domain_name: session.domain_name,
    };
    let ttl = bai.settings.conf_token_ttl;
    let token = apps::issue_conf_token(&state.store, &state.clock, ttl, app).await?;
    Ok(Json(TokenResponse {
        token: token.to_string(),
    }))
}

fn conf_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiConf",
        "Backend.AI: register where a session's app listens; answers a conf token",
    );
    let op = raises(
        op,
        400,
        "invalid-api-params (a bad field) or appproxy/invalid-session-parameter \
         (no session id or access key: `Not meant for inference apps`)",
    );
    let op = raises(
        op,
        401,
        "auth-failed: not from an allowed network and without the exact api_secret \
         in X-BackendAI-Token",
    );
    respond(op, 200, json_response::<TokenResponse>("The conf token"))
}

fn query_error(field: &str, msg: impl Into<String>) -> BaiError {
    validation_error(vec!["query".into(), field.into()], msg)
}

fn query_uuid(field: &str, value: &str) -> Result<Uuid, BaiError> {
    Uuid::parse_str(value.trim()).map_err(|_| query_error(field, "not a UUID"))
}

/// The app `query` asks for; the conf token, the session and the redirect
/// are checked here, the rest once the token is known.
fn app_request(query: ProxyQuery) -> Result<AppRequest, BaiError> {
    let token = query_uuid("token", &query.token)?;
    let session_id = query_uuid("session_id", &query.session_id)?;
    let redirect = redirect_path(query.redirect.as_deref().unwrap_or_default())
        .map_err(|why| query_error("redirect", why))?
        .to_owned();
    Ok(AppRequest {
        token,
        session_id,
        redirect,
        app: query.app,
        protocol: query.protocol,
        args: query.args,
        open_to_public: query.open_to_public,
        allowed_client_ips: query.allowed_client_ips,
        no_reuse: query.no_reuse,
        port: query.port,
        subdomain: query.subdomain,
    })
}

/// `GET /v2/proxy/auth`: the app's circuit, once its worker holds it, and
/// the worker's `/setup` URL (JSON for `Accept: application/json`, else a
/// 308 to it).
async fn auth(
    State(state): State<AppState>,
    Mode(bai): Mode,
    headers: HeaderMap,
    BaiQuery(query): BaiQuery<ProxyQuery>,
) -> Result<Response, BaiError> {
    let request = app_request(query)?;
    let opened = apps::open_app(&state.store, &state.clock, &bai, &request).await?;
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    if wants_json(accept) {
        return Ok(with_cors(
            Json(ProxyResponse {
                redirect_url: opened.setup_url,
                reuse: opened.reuse,
            })
            .into_response(),
        ));
    }
    let location = HeaderValue::from_str(&opened.setup_url).map_err(|_| BaiError::internal())?;
    Ok((
        StatusCode::PERMANENT_REDIRECT,
        [(header::LOCATION, location)],
        "308: Permanent Redirect",
    )
        .into_response())
}

fn auth_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiProxyAuth",
        "Backend.AI: the circuit of a session's app and the worker's setup URL",
    );
    let op = raises(
        op,
        400,
        "invalid-api-params: a bad parameter (token, session_id, protocol, port, \
         allowed_client_ips, a boolean)",
    );
    let op = raises(
        op,
        401,
        "invalid-credentials `E20007: Session ID mismatch`: the token is another session's",
    );
    let op = raises(op, 404, "object-not-found `E00002: No such token.`");
    let op = raises(
        op,
        409,
        "appproxy/port-not-available: the preferred port is taken",
    );
    let op = raises(
        op,
        503,
        "appproxy/worker-not-available or service-unavailable `E10001` (`data.worker`)",
    );
    let op = respond(
        op,
        200,
        json_response::<ProxyResponse>("With `Accept: application/json`"),
    );
    respond(
        op,
        308,
        text_response(
            "text/plain",
            "Otherwise: `Location` is the setup URL, the body `308: Permanent Redirect`",
        ),
    )
}

/// `GET /v2/proxy/{token}/{session_id}/add` (deprecated upstream): the
/// `/v2/proxy/auth` URL for these parameters.
async fn add(
    Mode(bai): Mode,
    BaiPath(AddPath { token, session_id }): BaiPath<AddPath>,
    RawQuery(query): RawQuery,
) -> Response {
    let mut url = format!("{}/v2/proxy/auth?", bai.settings.advertised_url);
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        url.push_str(&q);
        url.push('&');
    }
    url.push_str(&format!("token={token}&session_id={session_id}"));
    with_cors(Json(AddResponse { code: 200, url }).into_response())
}

fn add_docs(op: Op<'_>) -> Op<'_> {
    let op = operation(
        op,
        "backendaiProxyAdd",
        "Backend.AI (deprecated): the /v2/proxy/auth URL for a token and session",
    );
    respond(op, 200, json_response::<AddResponse>("The URL"))
}
