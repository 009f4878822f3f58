//! Server-Sent Event streams: a worker's own routes, or every route for
//! managers. The events and their order come from the hub.

use std::convert::Infallible;
use std::time::Duration;

use aide::axum::ApiRouter;
use aide::axum::routing::get_with;
use aide::transform::TransformOperation;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::Deserialize;

use super::auth::{ManagerOnly, WorkerSelf};
use super::openapi::{event_stream, raises};
use super::workers::NO_WORKER;
use super::{ApiError, ApiQuery, AppState};
use crate::domain::Revision;
use crate::domain::events::{Audience, StreamEvent};
use crate::hub::{SnapshotJson, StreamError};

/// Adds the watch streams to `router`.
pub fn endpoints(router: ApiRouter<AppState>) -> ApiRouter<AppState> {
    router
        .api_route("/workers/{id}/watch", get_with(worker, worker_docs))
        .api_route("/routes/watch", get_with(routes, routes_docs))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WatchQuery {
    /// Resume after this revision (or send `Last-Event-ID`); when absent or
    /// no longer retained, the stream starts with a snapshot.
    since: Option<Revision>,
}

/// `?since=` wins over `Last-Event-ID` (what browsers and SSE clients
/// resend); either must be a revision number when given.
fn resume_point(query: &WatchQuery, headers: &HeaderMap) -> Result<Option<Revision>, ApiError> {
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<Revision>().ok())
                .ok_or_else(|| ApiError::invalid("Last-Event-ID must be a revision number"))?,
        ),
    };
    Ok(query.since.or(last_event_id))
}

fn sse(events: impl Stream<Item = StreamEvent> + Send + 'static, keep_alive: Duration) -> Response {
    let events = events.map(|e| {
        Ok::<_, Infallible>(
            Event::default()
                .event(e.name())
                .id(e.revision().to_string())
                .data(e.data()),
        )
    });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(keep_alive))
        .into_response();
    // Tell buffering reverse proxies to pass events through as they come.
    response
        .headers_mut()
        .insert("x-accel-buffering", "no".parse().expect("valid header"));
    response
}

/// [`sse`] with a snapshot sent first as JSON straight from the database,
/// framed exactly as [`sse`] frames a `snapshot` event (`event:`, `id:`, one
/// `data:` line, a blank line), so clients cannot tell the two apart.
fn sse_after(
    snapshot: Option<SnapshotJson>,
    events: impl Stream<Item = StreamEvent> + Send + 'static,
    keep_alive: Duration,
) -> Response {
    let response = sse(events, keep_alive);
    let Some(snapshot) = snapshot else {
        return response;
    };
    let (parts, body) = response.into_parts();
    let head = format!(
        "event: snapshot\nid: {r}\ndata: {{\"revision\":{r},\"routes\":[",
        r = snapshot.revision
    );
    let routes = snapshot.routes.map(|chunk| {
        chunk.map(Bytes::from).map_err(|e| {
            tracing::warn!(error = %e, "watch stream ends: cannot read the snapshot");
            axum::BoxError::from(e)
        })
    });
    let framed = futures::stream::iter([Ok(Bytes::from(head))])
        .chain(routes)
        .chain(futures::stream::iter([Ok(Bytes::from_static(b"]}\n\n"))]))
        .chain(
            body.into_data_stream()
                .map(|c| c.map_err(axum::BoxError::from)),
        );
    Response::from_parts(parts, Body::from_stream(framed))
}

/// `GET /workers/{id}/watch`: that worker's routes.
async fn worker(
    State(state): State<AppState>,
    WorkerSelf(id): WorkerSelf,
    ApiQuery(query): ApiQuery<WatchQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let since = resume_point(&query, &headers)?;
    state.store.get_worker(id).await?;
    let (snapshot, events) = state
        .hub
        .open_streamed(Audience::Worker(id), since)
        .await
        .map_err(stream_error)?;
    Ok(sse_after(snapshot, events, state.keep_alive))
}

fn worker_docs(op: TransformOperation<'_>) -> TransformOperation<'_> {
    let op = op
        .id("watchWorker")
        .tag("workers")
        .summary("A worker's routes as Server-Sent Events");
    let op = event_stream(op);
    raises(op, 404, NO_WORKER)
}

/// `GET /routes/watch`: every route change.
async fn routes(
    State(state): State<AppState>,
    _: ManagerOnly,
    ApiQuery(query): ApiQuery<WatchQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let since = resume_point(&query, &headers)?;
    let (snapshot, events) = state
        .hub
        .open_streamed(Audience::Manager, since)
        .await
        .map_err(stream_error)?;
    Ok(sse_after(snapshot, events, state.keep_alive))
}

fn routes_docs(op: TransformOperation<'_>) -> TransformOperation<'_> {
    let op = op
        .id("watchRoutes")
        .tag("routes")
        .summary("Every route change as Server-Sent Events");
    event_stream(op)
}

/// A stream that cannot open: 503 while the log cannot be read, 404 when its
/// worker was removed meanwhile.
fn stream_error(e: StreamError) -> ApiError {
    match e {
        StreamError::Store(e) => {
            tracing::warn!(error = %e, "cannot open a watch stream");
            ApiError::unavailable("cannot read the change log; retry shortly")
        }
        StreamError::WorkerRemoved => ApiError::not_found("the worker was removed"),
    }
}
