//! Route, session and lookup endpoints (manager token).

use aide::axum::ApiRouter;
use aide::axum::routing::{delete_with, get_with};
use aide::transform::TransformOperation;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::auth::{AnyCaller, Caller, ManagerOnly};
use super::openapi::{self, json_response, raises, respond};
use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, RoutePath, SessionPath, json};
use crate::domain::{Route, RoutePatch, RouteSpec};
use crate::store::{RouteFilter, Upserted};

type Op<'a> = TransformOperation<'a>;

const NO_ROUTE: &str = "not-found: no such route";
const NO_PINNED_WORKER: &str = "not-found: the worker `worker_id` pins the route to does not exist";

/// Adds the routes', sessions' and lookup's endpoints to `router`.
pub fn endpoints(router: ApiRouter<AppState>) -> ApiRouter<AppState> {
    router
        .api_route(
            "/routes",
            get_with(list, list_docs).post_with(create, create_docs),
        )
        .api_route(
            "/routes/{id}",
            get_with(get, get_docs)
                .put_with(upsert, upsert_docs)
                .patch_with(patch, patch_docs)
                .delete_with(delete, delete_docs),
        )
        .api_route(
            "/sessions/{session_id}",
            delete_with(delete_session, delete_session_docs),
        )
        .api_route(
            "/sessions/{session_id}/routes",
            get_with(session_routes, session_routes_docs),
        )
        .api_route("/lookup", get_with(lookup, lookup_docs))
}

fn created(route: Route) -> Response {
    let location = format!("/routes/{}", route.id);
    (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        axum::Json(route),
    )
        .into_response()
}

async fn create(
    State(state): State<AppState>,
    _: ManagerOnly,
    ApiJson(spec): ApiJson<RouteSpec>,
) -> Result<Response, ApiError> {
    let now = state.clock.now();
    let route = state.store.create_route(Uuid::now_v7(), spec, now).await?;
    Ok(created(route))
}

fn create_docs(op: Op<'_>) -> Op<'_> {
    let op = op
        .id("createRoute")
        .tag("routes")
        .summary("Create a route: place it on a worker and allocate its frontend");
    let op = respond(op, 201, openapi::created::<Route>("The route"));
    let op = raises(op, 404, NO_PINNED_WORKER);
    let op = raises(
        op,
        409,
        "conflict: the session already has this service, the endpoint a route, or the \
         requested port is taken; `existing` is the route in the way, when there is one",
    );
    raises(
        op,
        503,
        "no-eligible-worker: no worker can take the route (the detail says why), or \
         unavailable: the database does not answer",
    )
}

async fn upsert(
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

fn upsert_docs(op: Op<'_>) -> Op<'_> {
    let op = op
        .id("upsertRoute")
        .tag("routes")
        .summary("Create or update a route by id (idempotent)");
    let op = respond(op, 201, openapi::created::<Route>("Created"));
    let op = respond(op, 200, json_response::<Route>("Updated, or unchanged"));
    let op = raises(op, 404, NO_PINNED_WORKER);
    let op = raises(
        op,
        409,
        "conflict: another route has this identity, the requested port is taken, or the \
         route exists with another identity or protocol",
    );
    raises(
        op,
        503,
        "no-eligible-worker: no worker can take the route, or unavailable: the database \
         does not answer",
    )
}

async fn patch(
    State(state): State<AppState>,
    _: ManagerOnly,
    ApiPath(RoutePath { id }): ApiPath<RoutePath>,
    ApiJson(patch): ApiJson<RoutePatch>,
) -> Result<Response, ApiError> {
    let now = state.clock.now();
    let route = state.store.patch_route(id, patch, now).await?;
    Ok(json(StatusCode::OK, route))
}

fn patch_docs(op: Op<'_>) -> Op<'_> {
    let op = op
        .id("patchRoute")
        .tag("routes")
        .summary("Change a route's targets, access, labels, envs, args, health check or expiry")
        .description("Absent fields stay; `null` clears an optional one.");
    let op = respond(op, 200, json_response::<Route>("The route"));
    raises(op, 404, NO_ROUTE)
}

async fn get(
    State(state): State<AppState>,
    _: ManagerOnly,
    ApiPath(RoutePath { id }): ApiPath<RoutePath>,
) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, state.store.get_route(id).await?))
}

fn get_docs(op: Op<'_>) -> Op<'_> {
    let op = op.id("getRoute").tag("routes").summary("One route");
    let op = respond(op, 200, json_response::<Route>("The route"));
    raises(op, 404, NO_ROUTE)
}

async fn delete(
    State(state): State<AppState>,
    _: ManagerOnly,
    ApiPath(RoutePath { id }): ApiPath<RoutePath>,
) -> Result<StatusCode, ApiError> {
    let now = state.clock.now();
    state.store.delete_route(id, now).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn delete_docs(op: Op<'_>) -> Op<'_> {
    let op = op.id("deleteRoute").tag("routes").summary("Delete a route");
    let op = respond(
        op,
        204,
        aide::openapi::Response {
            description: "Deleted".into(),
            ..Default::default()
        },
    );
    raises(op, 404, NO_ROUTE)
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

async fn list(
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

fn list_docs(op: Op<'_>) -> Op<'_> {
    let op = op
        .id("listRoutes")
        .tag("routes")
        .summary("Routes, filtered, in pages");
    respond(
        op,
        200,
        json_response::<RouteList>("A page; `next_cursor` fetches the next"),
    )
}

/// Every route of one session.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SessionRoutes {
    pub items: Vec<Route>,
}

async fn session_routes(
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

fn session_routes_docs(op: Op<'_>) -> Op<'_> {
    let op = op
        .id("listSessionRoutes")
        .tag("sessions")
        .summary("Every route of a session");
    respond(
        op,
        200,
        json_response::<SessionRoutes>("The session's routes (none is not an error)"),
    )
}

/// How many routes a session deletion removed.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Deleted {
    pub deleted: u64,
}

async fn delete_session(
    State(state): State<AppState>,
    _: ManagerOnly,
    ApiPath(SessionPath { session_id }): ApiPath<SessionPath>,
) -> Result<Response, ApiError> {
    let now = state.clock.now();
    let deleted = state.store.delete_session(session_id, now).await?;
    Ok(json(StatusCode::OK, Deleted { deleted }))
}

fn delete_session_docs(op: Op<'_>) -> Op<'_> {
    let op = op
        .id("deleteSession")
        .tag("sessions")
        .summary("Delete every route of a terminated session, in one transaction");
    respond(
        op,
        200,
        json_response::<Deleted>("How many routes went (0 is not an error)"),
    )
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
async fn lookup(
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

fn lookup_docs(op: Op<'_>) -> Op<'_> {
    let op = op
        .id("lookup")
        .tag("routes")
        .summary("Resolve a worker's port or subdomain to its route");
    let op = respond(op, 200, json_response::<Route>("The route"));
    raises(op, 404, "not-found: no route on that worker's frontend")
}
