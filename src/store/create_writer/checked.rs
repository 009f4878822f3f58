//! The checked way of the create writer: a batch that the optimistic ways
//! could not write (a conflict, a port taken) reads which requested ids and
//! keys are taken first, and answers each conflict with the route in the way.

use uuid::Uuid;

use super::insert::insert_statement;
use super::{NewRoute, placed_route};
use crate::domain::events::ChangeKind;
use crate::domain::placement::PlacementError;
use crate::domain::{Route, RouteKey, RouteSpec, StoredRoute};
use crate::store::placer_cache::WorkerCache;
use crate::store::rows::{self, route_columns};
use crate::store::sql::{self, Arg};
use crate::store::{Result, Store, StoreError};

impl Store {
    /// The checked create: reads which requested ids and keys are taken
    /// first, so each conflict is answered with the route that holds it.
    pub(super) async fn create_routes_checked(
        &self,
        requests: &[NewRoute],
        cache: &mut WorkerCache,
    ) -> Result<Vec<Result<Route>>> {
        let mut tx = self.write().await?;
        let mut lease = cache.lease(&mut tx).await?;
        let stored = claimed_keys(&mut tx.conn(), requests).await?;
        let mut created: Vec<(StoredRoute, Route)> = Vec::new();
        // Each created route's change carries its request's trace context.
        let mut traces: Vec<Option<String>> = Vec::new();
        let mut answers = Vec::with_capacity(requests.len());
        for request in requests {
            let spec = &request.spec;
            let key = spec.key();
            let claimed = || stored.iter().chain(created.iter().map(|(s, _)| s));
            if claimed().any(|r| r.id == request.id) {
                answers.push(Err(StoreError::Conflict {
                    message: format!("route {} already exists", request.id),
                    existing: None,
                }));
                continue;
            }
            if let Some(r) = claimed().find(|r| r.spec.key() == key) {
                let r = r.clone();
                let worker = match r.worker_id {
                    Some(id) => rows::worker(&mut tx.conn(), id).await?,
                    None => None,
                };
                answers.push(Err(StoreError::Conflict {
                    message: conflict_message(spec),
                    existing: Some(Box::new(r.into_route(worker.as_ref()))),
                }));
                continue;
            }
            let placed = rows::place(&mut tx.conn(), &mut lease.placer, spec).await?;
            let (worker, assignment) = match placed {
                Ok(placed) => placed,
                Err(PlacementError::PortTaken(port)) => {
                    let (holder, worker) = match spec.worker_id {
                        Some(w) => (
                            port_holder(&mut tx.conn(), &created, w, port).await?,
                            rows::worker(&mut tx.conn(), w).await?,
                        ),
                        None => (None, None),
                    };
                    answers.push(Err(StoreError::Conflict {
                        message: format!("frontend port {port} is already in use"),
                        existing: holder.map(|h| Box::new(h.into_route(worker.as_ref()))),
                    }));
                    continue;
                }
                Err(e) => {
                    answers.push(Err(e.into()));
                    continue;
                }
            };
            lease.touched.push(worker.id);
            let placed = placed_route(request, &worker, &assignment, tx.next_revision());
            answers.push(Ok(placed.1.clone()));
            created.push(placed);
            traces.push(request.trace.clone());
        }
        if created.is_empty() {
            let head = tx.head();
            tx.rollback().await?;
            lease.committed(head);
            return Ok(answers);
        }
        let (query, args) = insert_statement(&created, "");
        tx.conn().execute(sqlx::AssertSqlSafe(query), &args).await?;
        for ((r, wire), trace) in created.iter().zip(traces) {
            tx.log_traced(
                r.revision,
                ChangeKind::RouteUpsert,
                Some(r.id),
                r.worker_id,
                Arg::json(wire),
                r.created_at,
                trace,
            );
        }
        let revision = tx.commit().await?;
        lease.committed(revision);
        Ok(answers)
    }
}

fn conflict_message(spec: &RouteSpec) -> String {
    match spec.key() {
        RouteKey::Interactive {
            session_id,
            service,
        } => format!("session {session_id} already has a {service} route"),
        RouteKey::Inference { endpoint_id } => {
            format!("endpoint {endpoint_id} already has a route")
        }
    }
}

/// Stored routes that hold a requested id or unique key.
async fn claimed_keys(conn: &mut sql::Conn<'_>, requests: &[NewRoute]) -> Result<Vec<StoredRoute>> {
    let mut args: Vec<Arg> = requests.iter().map(|r| r.id.into()).collect();
    let mut query = format!(
        "SELECT {} FROM routes WHERE id IN ({})",
        route_columns!(),
        sql::list(args.len(), 1)
    );
    let (mut sessions, mut endpoints) = (Vec::new(), Vec::new());
    for r in requests {
        match r.spec.key() {
            RouteKey::Interactive { session_id, .. } => sessions.push(session_id),
            RouteKey::Inference { endpoint_id } => endpoints.push(endpoint_id),
        }
    }
    for (mode, column, keys) in [
        ("interactive", "session_id", sessions),
        ("inference", "endpoint_id", endpoints),
    ] {
        if keys.is_empty() {
            continue;
        }
        query.push_str(&format!(
            " OR (app_mode = '{mode}' AND {column} IN ({}))",
            sql::list(keys.len(), args.len() + 1)
        ));
        args.extend(keys.into_iter().map(Arg::from));
    }
    let rows: Vec<rows::RouteRow> = conn.fetch_all(sqlx::AssertSqlSafe(query), &args).await?;
    Ok(rows.into_iter().map(StoredRoute::from).collect())
}

/// The route holding `port` on `worker`: one of this batch's, or a stored one.
async fn port_holder(
    conn: &mut sql::Conn<'_>,
    created: &[(StoredRoute, Route)],
    worker: Uuid,
    port: u16,
) -> Result<Option<StoredRoute>> {
    if let Some((s, _)) = created
        .iter()
        .find(|(s, _)| s.worker_id == Some(worker) && s.port == Some(port))
    {
        return Ok(Some(s.clone()));
    }
    rows::route(
        conn,
        concat!(
            "SELECT ",
            route_columns!(),
            " FROM routes WHERE worker_id = $1 AND frontend_port = $2"
        ),
        &[worker.into(), port.into()],
    )
    .await
}
