//! What the Manager's `/v2/conf` and the browser's `/v2/proxy/auth` do with
//! interactive apps: a conf token for where a session's app listens, then
//! the app's circuit (the interactive route of (session, app)), once its
//! worker holds it, and the worker's setup URL. The rules they follow
//! (protocols, client networks, sizes, redirects, who may use a circuit) are
//! [`super::interactive`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

use super::circuit::{WEIGHT_PER_RATIO, worker_api_url};
use super::circuits::worker_of;
use super::interactive::{
    client_networks, conf_fields_fit, parse_bool, same_user, served_protocol, setup_claims,
};
use super::{BackendAi, Error, jwt};
use crate::clock::Clock;
use crate::domain::{
    Access, AppMode, CircuitInfo, FrontendRequest, Protocol, Route, RouteSpec, Target, app_filter,
};
use crate::store::{ConfToken, Store, StoreError};

/// Where a session's app listens, as the Manager says it (`/v2/conf`).
#[derive(Clone, Debug)]
pub struct AppAddress {
    pub login_session_token: Option<String>,
    pub kernel_host: String,
    pub kernel_port: u16,
    pub session_id: Option<Uuid>,
    pub user_uuid: Uuid,
    pub project_id: Uuid,
    pub access_key: Option<String>,
    pub domain_name: String,
}

/// Checks `app` and stores it as a conf token usable for `ttl`; answers the
/// token.
pub async fn issue_conf_token(
    store: &Store,
    clock: &Clock,
    ttl: Duration,
    app: AppAddress,
) -> Result<Uuid, Error> {
    conf_fields_fit([
        app.login_session_token.as_deref(),
        Some(&app.kernel_host),
        app.access_key.as_deref(),
        Some(&app.domain_name),
    ])
    .map_err(|(field, msg)| Error::Invalid {
        loc: field.split('.').map(str::to_owned).collect(),
        msg,
    })?;
    let access_key = app.access_key.filter(|k| !k.is_empty());
    let (Some(session_id), Some(access_key)) = (app.session_id, access_key) else {
        return Err(Error::InvalidSessionParameter(
            "Not meant for inference apps".into(),
        ));
    };
    if app.kernel_port == 0 {
        return Err(Error::invalid(
            &["kernel_port"],
            "must be between 1 and 65535",
        ));
    }
    let token = ConfToken {
        id: Uuid::new_v4(),
        login_session_token: app.login_session_token,
        kernel_host: app.kernel_host,
        kernel_port: app.kernel_port,
        session_id,
        user_uuid: app.user_uuid,
        group_id: app.project_id,
        access_key,
        domain_name: app.domain_name,
        created_at: clock.now(),
    };
    store.insert_conf_token(&token, ttl).await?;
    Ok(token.id)
}

/// What `/v2/proxy/auth` asks for: the conf token and its session, checked
/// by the caller, and the rest as the query carries it (read by upstream's
/// rules once the token is known).
#[derive(Clone, Debug)]
pub struct AppRequest {
    /// The conf token's id.
    pub token: Uuid,
    pub session_id: Uuid,
    /// The path the worker sends the browser to after `/setup`, checked
    /// ([`super::interactive::redirect_path`]).
    pub redirect: String,
    pub app: String,
    /// `http`, `grpc`, `h2`, `tcp`, `preopen`, `vnc` or `rdp`.
    pub protocol: String,
    pub args: Option<String>,
    pub open_to_public: Option<String>,
    /// Comma-separated CIDRs.
    pub allowed_client_ips: Option<String>,
    pub no_reuse: Option<String>,
    pub port: Option<String>,
    pub subdomain: Option<String>,
}

/// An app opened: where the browser goes next.
#[derive(Clone, Debug)]
pub struct OpenedApp {
    /// The worker's `/setup` with the setup token.
    pub setup_url: String,
    /// The circuit existed with these settings (never for tcp).
    pub reuse: bool,
}

/// Opens the app `request` asks for: its circuit (found, updated or
/// created), once its worker holds it, and the worker's setup URL.
pub async fn open_app(
    store: &Store,
    clock: &Clock,
    bai: &BackendAi,
    request: &AppRequest,
) -> Result<OpenedApp, Error> {
    let conf = store
        .conf_token(request.token, clock.now(), bai.settings.conf_token_ttl)
        .await?
        .ok_or_else(|| Error::not_found("token"))?;
    if conf.session_id != request.session_id {
        return Err(Error::InvalidCredentials(
            "E20007: Session ID mismatch".into(),
        ));
    }
    let (spec, no_reuse) = circuit_spec(request, &conf)?;
    let mut expected = bai.acks.expect();
    let (route, reuse) = circuit_for(store, clock, spec, no_reuse).await?;
    let worker = worker_of(store, &route).await?;
    expected.add(&route, &worker)?;
    expected.wait(store, bai.settings.ack_timeout).await?;
    let token = jwt::encode(
        &setup_claims(conf.id, &request.redirect, route.id),
        bai.settings.secrets.jwt_secret.expose(),
    );
    Ok(OpenedApp {
        setup_url: format!("{}/setup?token={token}", worker_api_url(&worker)),
        reuse: reuse && route.protocol != Protocol::Tcp,
    })
}

fn query_error(field: &str, msg: impl Into<String>) -> Error {
    Error::invalid(&["query", field], msg)
}

fn query_bool(field: &str, value: Option<&str>) -> Result<bool, Error> {
    match value {
        None => Ok(false),
        Some(v) => parse_bool(v).ok_or_else(|| query_error(field, "not a boolean")),
    }
}

/// The circuit `wanted` asks for with `conf`'s address, and whether the
/// caller refused reuse (`no_reuse`).
fn circuit_spec(wanted: &AppRequest, conf: &ConfToken) -> Result<(RouteSpec, bool), Error> {
    let (protocol, app_protocol) = served_protocol(&wanted.protocol)
        .ok_or_else(|| query_error("protocol", "one of http, grpc, h2, tcp, preopen, vnc, rdp"))?;
    let port = match wanted.port.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| query_error("port", "not a port"))?,
        ),
    };
    let subdomain = wanted
        .subdomain
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let allowed_client_ips = client_networks(wanted.allowed_client_ips.as_deref())
        .map_err(|msg| query_error("allowed_client_ips", msg))?;
    let spec = RouteSpec {
        app_mode: AppMode::Interactive,
        session_id: Some(conf.session_id),
        endpoint_id: None,
        service: wanted.app.clone(),
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
            open_to_public: query_bool("open_to_public", wanted.open_to_public.as_deref())?,
            allowed_client_ips,
        },
        labels: Default::default(),
        envs: Default::default(),
        args: wanted.args.clone().map(Value::String),
        health_check: None,
        expires_at: None,
        circuit: Some(CircuitInfo {
            user_id: Some(conf.user_uuid),
            runtime_variant: None,
            session_ids: vec![conf.session_id],
            app_protocol,
            health_check: None,
            properties: session_properties(conf),
        }),
    };
    let no_reuse = query_bool("no_reuse", wanted.no_reuse.as_deref())?;
    Ok((spec, no_reuse))
}

/// What workers' app filters match of an interactive app: its session as
/// upstream describes it (`SessionConfig`), from the conf token.
fn session_properties(conf: &ConfToken) -> BTreeMap<String, String> {
    app_filter::properties([
        ("session.id", Some(conf.session_id.to_string())),
        ("session.user_uuid", Some(conf.user_uuid.to_string())),
        ("session.project_id", Some(conf.group_id.to_string())),
        ("session.access_key", Some(conf.access_key.clone())),
        ("session.domain_name", Some(conf.domain_name.clone())),
    ])
}

/// The session's circuit for the app: the existing one (updated in place
/// when it differs) or a new one; and whether it was reused as it was.
async fn circuit_for(
    store: &Store,
    clock: &Clock,
    spec: RouteSpec,
    no_reuse: bool,
) -> Result<(Route, bool), Error> {
    let session_id = spec.session_id.unwrap_or_default();
    let token_user = spec
        .circuit
        .as_ref()
        .and_then(|c| c.user_id)
        .unwrap_or_default();
    if let Some((route, _)) = store.session_route(session_id, &spec.service).await? {
        let owner = route.circuit.as_ref().and_then(|c| c.user_id);
        if !same_user(owner, token_user) {
            return Err(Error::Forbidden(
                "This app of the session is open for another user".into(),
            ));
        }
        if route.protocol == spec.protocol {
            let same = route.access == spec.access;
            let route = store
                .edit_route(route.id, clock.now(), |current| {
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
        match store.delete_route(route.id, clock.now()).await {
            Ok(()) | Err(StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    match store
        .create_route(Uuid::now_v7(), spec.clone(), clock.now())
        .await
    {
        Ok(route) => Ok((route, false)),
        Err(StoreError::Conflict {
            existing: Some(route),
            ..
        }) if route.session_id == Some(session_id) && route.service == spec.service => {
            Ok((*route, false))
        }
        Err(e) => Err(Error::creating(e)),
    }
}
