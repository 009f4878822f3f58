//! Interactive apps: `POST /v2/conf` (the Manager says where a session's
//! app listens and gets a conf token) and `GET /v2/proxy/auth` (the user's
//! browser trades it for the app's circuit and a setup token for the
//! worker). An app's circuit is the interactive route of (session, app).
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

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::auth::{ConfCaller, Mode};
use super::endpoints::{
    SessionConfig, TokenResponse, await_acks, create_error, needs_ack, worker_of,
};
use super::{BaiError, BaiJson, BaiPath, BaiQuery, validation_error};
use crate::api::AppState;
use crate::backendai::circuit::{WEIGHT_PER_RATIO, worker_api_url};
use crate::backendai::interactive::{
    client_networks, conf_fields_fit, parse_bool, redirect_path, same_user, served_protocol,
    setup_claims, wants_json,
};
use crate::backendai::jwt;
use crate::domain::{
    Access, AppMode, CircuitInfo, FrontendRequest, Protocol, Route, RouteSpec, Target,
};
use crate::store::{ConfToken, StoreError};

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
pub async fn conf(
    State(state): State<AppState>,
    ConfCaller(bai): ConfCaller,
    BaiJson(request): BaiJson<ConfRequest>,
) -> Result<Json<TokenResponse>, BaiError> {
    conf_fields_fit([
        request.login_session_token.as_deref(),
        Some(&request.kernel_host),
        request.session.access_key.as_deref(),
        Some(&request.session.domain_name),
    ])
    .map_err(|(field, msg)| {
        let loc = field.split('.').map(Value::from).collect();
        validation_error(loc, msg)
    })?;
    let session = request.session;
    let access_key = session.access_key.filter(|k| !k.is_empty());
    let (Some(session_id), Some(access_key)) = (session.id, access_key) else {
        return Err(BaiError::invalid_session_parameter(
            "Not meant for inference apps",
        ));
    };
    if request.kernel_port == 0 {
        return Err(validation_error(
            vec!["kernel_port".into()],
            "must be between 1 and 65535",
        ));
    }
    let token = ConfToken {
        id: Uuid::new_v4(),
        login_session_token: request.login_session_token,
        kernel_host: request.kernel_host,
        kernel_port: request.kernel_port,
        session_id,
        user_uuid: session.user_uuid,
        group_id: session.project_id,
        access_key,
        domain_name: session.domain_name,
        created_at: state.clock.now(),
    };
    state
        .store
        .insert_conf_token(&token, bai.settings.conf_token_ttl)
        .await?;
    Ok(Json(TokenResponse {
        token: token.id.to_string(),
    }))
}

fn query_error(field: &str, msg: impl Into<String>) -> BaiError {
    validation_error(vec!["query".into(), field.into()], msg)
}

fn query_bool(field: &str, value: Option<&str>) -> Result<bool, BaiError> {
    match value {
        None => Ok(false),
        Some(v) => parse_bool(v).ok_or_else(|| query_error(field, "not a boolean")),
    }
}

fn query_uuid(field: &str, value: &str) -> Result<Uuid, BaiError> {
    Uuid::parse_str(value.trim()).map_err(|_| query_error(field, "not a UUID"))
}

/// What `/v2/proxy/auth` asks for, checked.
struct Wanted {
    spec: RouteSpec,
    no_reuse: bool,
}

fn wanted(query: &ProxyQuery, conf: &ConfToken) -> Result<Wanted, BaiError> {
    let (protocol, app_protocol) = served_protocol(&query.protocol)
        .ok_or_else(|| query_error("protocol", "one of http, grpc, h2, tcp, preopen, vnc, rdp"))?;
    let port = match query.port.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| query_error("port", "not a port"))?,
        ),
    };
    let subdomain = query
        .subdomain
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let allowed_client_ips = client_networks(query.allowed_client_ips.as_deref())
        .map_err(|msg| query_error("allowed_client_ips", msg))?;
    let spec = RouteSpec {
        app_mode: AppMode::Interactive,
        session_id: Some(conf.session_id),
        endpoint_id: None,
        service: query.app.clone(),
        protocol,
        targets: vec![Target {
            id: None,
            host: conf.kernel_host.clone(),
            port: conf.kernel_port,
            weight: WEIGHT_PER_RATIO as u32,
            session_id: Some(conf.session_id),
        }],
        frontend: FrontendRequest { port, subdomain },
        worker_id: None,
        access: Access {
            open_to_public: query_bool("open_to_public", query.open_to_public.as_deref())?,
            allowed_client_ips,
        },
        labels: Default::default(),
        envs: Default::default(),
        args: query.args.clone().map(Value::String),
        health_check: None,
        expires_at: None,
        circuit: Some(CircuitInfo {
            user_id: Some(conf.user_uuid),
            runtime_variant: None,
            session_ids: vec![conf.session_id],
            app_protocol,
            health_check: None,
        }),
    };
    Ok(Wanted {
        spec,
        no_reuse: query_bool("no_reuse", query.no_reuse.as_deref())?,
    })
}

/// The session's circuit for the app: the existing one (updated in place
/// when it differs) or a new one; and whether it was reused as it was.
async fn circuit_for(state: &AppState, wanted: Wanted) -> Result<(Route, bool), BaiError> {
    let Wanted { spec, no_reuse } = wanted;
    let session_id = spec.session_id.unwrap_or_default();
    let token_user = spec
        .circuit
        .as_ref()
        .and_then(|c| c.user_id)
        .unwrap_or_default();
    if let Some((route, _)) = state.store.session_route(session_id, &spec.service).await? {
        let owner = route.circuit.as_ref().and_then(|c| c.user_id);
        if !same_user(owner, token_user) {
            return Err(BaiError::forbidden(
                "This app of the session is open for another user",
            ));
        }
        if route.protocol == spec.protocol {
            let same = route.access == spec.access;
            let route = state
                .store
                .edit_route(route.id, state.clock.now(), |current| {
                    current.access = spec.access.clone();
                    current.targets = spec.targets.clone();
                    current.args = spec.args.clone();
                    current.circuit = spec.circuit.clone();
                    Ok::<_, StoreError>(())
                })
                .await?;
            return Ok((route, same && !no_reuse));
        }
        // Another protocol is another circuit: the app was restarted as
        // something else.
        match state.store.delete_route(route.id, state.clock.now()).await {
            Ok(()) | Err(StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    match state
        .store
        .create_route(Uuid::now_v7(), spec.clone(), state.clock.now())
        .await
    {
        Ok(route) => Ok((route, false)),
        Err(StoreError::Conflict {
            existing: Some(route),
            ..
        }) if route.session_id == Some(session_id) && route.service == spec.service => {
            Ok((*route, false))
        }
        Err(e) => Err(create_error(e)),
    }
}

/// `GET /v2/proxy/auth`: the app's circuit, once its worker holds it, and
/// the worker's `/setup` URL (JSON for `Accept: application/json`, else a
/// 308 to it).
pub async fn auth(
    State(state): State<AppState>,
    Mode(bai): Mode,
    headers: HeaderMap,
    BaiQuery(query): BaiQuery<ProxyQuery>,
) -> Result<Response, BaiError> {
    let token_id = query_uuid("token", &query.token)?;
    let session_id = query_uuid("session_id", &query.session_id)?;
    let redirect = redirect_path(query.redirect.as_deref().unwrap_or_default())
        .map_err(|why| query_error("redirect", why))?
        .to_owned();
    let conf = state
        .store
        .conf_token(token_id, state.clock.now(), bai.settings.conf_token_ttl)
        .await?
        .ok_or_else(|| BaiError::not_found("token"))?;
    if conf.session_id != session_id {
        return Err(BaiError::invalid_credentials("E20007: Session ID mismatch"));
    }
    let wanted = wanted(&query, &conf)?;
    let waiter = bai.acks.subscribe();
    let (route, reuse) = circuit_for(&state, wanted).await?;
    let worker = worker_of(&state, &route).await?;
    if needs_ack(&route, &worker)? {
        await_acks(&state, &bai, waiter, &[(route.id, worker.name.clone())]).await?;
    }
    let token = jwt::encode(
        &setup_claims(conf.id, &redirect, route.id),
        bai.settings.secrets.jwt_secret.expose(),
    );
    let redirect_url = format!("{}/setup?token={token}", worker_api_url(&worker));
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    if wants_json(accept) {
        let reuse = reuse && route.protocol != Protocol::Tcp;
        return Ok(with_cors(
            Json(ProxyResponse {
                redirect_url,
                reuse,
            })
            .into_response(),
        ));
    }
    let location = HeaderValue::from_str(&redirect_url).map_err(|_| BaiError::internal())?;
    Ok((
        StatusCode::PERMANENT_REDIRECT,
        [(header::LOCATION, location)],
        "308: Permanent Redirect",
    )
        .into_response())
}

/// `GET /v2/proxy/{token}/{session_id}/add` (deprecated upstream): the
/// `/v2/proxy/auth` URL for these parameters.
pub async fn add(
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
