//! Route, session and lookup endpoints (manager token).

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::auth::{AnyCaller, Caller, ManagerOnly};
use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, RoutePath, SessionPath, json};
use crate::domain::{Route, RoutePatch, RouteSpec};
use crate::store::{RouteFilter, Upserted};

fn created(route: Route) -> Response {
    let location = format!("/routes/{}", route.id);
    (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        axum::Json(route),
    )
        .into_response()
}

pub async fn create(
    State(state): State<AppState>,
    _: ManagerOnly,
    ApiJson(spec): ApiJson<RouteSpec>,
) -> Result<Response, ApiError> {
    let now = state.clock.now();
    let route = state.store.create_route(Uuid::now_v7(), spec, now).await?;
    Ok(created(route))
}

pub async fn upsert(
    State(state): State<AppState>,
    _: ManagerOnly,
    ApiPath(RoutePath { id }): ApiPath<RoutePath>,
    ApiJson(spec): ApiJson<RouteSpec>,
) -> Result<Response, ApiError> {
    let now = state.clock.now();
    Ok(match state.store.upsert_route(id, spec, now).await? {
        Upserted::Created(route) => created(route),
        Upserted::Updated(route) | Upserted::Unchanged(route) => json(StatusCode::OK, route),
    })
}

pub async fn patch(
    State(state): State<AppState>,
    _: ManagerOnly,
    ApiPath(RoutePath { id }): ApiPath<RoutePath>,
    ApiJson(patch): ApiJson<RoutePatch>,
) -> Result<Response, ApiError> {
    let now = state.clock.now();
    let route = state.store.patch_route(id, patch, now).await?;
    Ok(json(StatusCode::OK, route))
}

pub async fn get(
    State(state): State<AppState>,
    _: ManagerOnly,
    ApiPath(RoutePath { id }): ApiPath<RoutePath>,
) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, state.store.get_route(id).await?))
}

pub async fn delete(
    State(state): State<AppState>,
    _: ManagerOnly,
    ApiPath(RoutePath { id }): ApiPath<RoutePath>,
) -> Result<StatusCode, ApiError> {
    let now = state.clock.now();
    state.store.delete_route(id, now).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    session_id: Option<Uuid>,
    endpoint_id: Option<Uuid>,
    worker_id: Option<Uuid>,
    service: Option<String>,
    /// Routes per page (default 100).
    #[schemars(range(min = 1, max = MAX_PAGE))]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<Uuid>,
}

/// A page of routes.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RouteList {
    pub items: Vec<Route>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    pub next_cursor: Option<String>,
}

pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 1000;

pub async fn list(
    State(state): State<AppState>,
    _: ManagerOnly,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!("limit must be 1..={MAX_PAGE}")));
    }
    let filter = RouteFilter {
        session_id: q.session_id,
        endpoint_id: q.endpoint_id,
        worker_id: q.worker_id,
        service: q.service,
    };
    let page = state.store.list_routes(&filter, limit, q.cursor).await?;
    Ok(json(
        StatusCode::OK,
        RouteList {
            items: page.items,
            next_cursor: page.next_cursor.map(|c| c.to_string()),
        },
    ))
}

/// Every route of one session.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SessionRoutes {
    pub items: Vec<Route>,
}

pub async fn session_routes(
    State(state): State<AppState>,
    _: ManagerOnly,
    ApiPath(SessionPath { session_id }): ApiPath<SessionPath>,
) -> Result<Response, ApiError> {
    let filter = RouteFilter {
        session_id: Some(session_id),
        ..RouteFilter::default()
    };
    let mut items = Vec::new();
    let mut cursor = None;
    loop {
        let page = state.store.list_routes(&filter, MAX_PAGE, cursor).await?;
        items.extend(page.items);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    Ok(json(StatusCode::OK, SessionRoutes { items }))
}

/// How many routes a session deletion removed.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Deleted {
    pub deleted: u64,
}

pub async fn delete_session(
    State(state): State<AppState>,
    _: ManagerOnly,
    ApiPath(SessionPath { session_id }): ApiPath<SessionPath>,
) -> Result<Response, ApiError> {
    let now = state.clock.now();
    let deleted = state.store.delete_session(session_id, now).await?;
    Ok(json(StatusCode::OK, Deleted { deleted }))
}

/// A worker and one of its frontends: a port or a subdomain, not both.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("oneOf" = [{"required": ["port"]}, {"required": ["subdomain"]}]))]
pub struct LookupQuery {
    worker_id: Uuid,
    #[schemars(range(min = 1))]
    port: Option<u16>,
    subdomain: Option<String>,
}

/// Resolves a worker's frontend to its route: the manager, or the worker itself.
pub async fn lookup(
    State(state): State<AppState>,
    AnyCaller(caller): AnyCaller,
    ApiQuery(q): ApiQuery<LookupQuery>,
) -> Result<Response, ApiError> {
    match caller {
        Caller::Manager => {}
        Caller::Worker(w) if w == q.worker_id => {}
        _ => {
            return Err(ApiError::forbidden(
                "lookup needs the manager token or the token of the worker it names",
            ));
        }
    }
    if q.port.is_some() == q.subdomain.is_some() {
        return Err(ApiError::invalid("give exactly one of port and subdomain"));
    }
    let route = state
        .store
        .lookup(q.worker_id, q.port, q.subdomain.as_deref())
        .await
        .map_err(|e| match e {
            crate::store::StoreError::NotFound => {
                ApiError::not_found("no route on that worker's frontend")
            }
            e => e.into(),
        })?;
    Ok(json(StatusCode::OK, route))
}
