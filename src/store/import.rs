//! Rows taken over from another coordinator (`crate::takeover`): workers
//! with their ids, routes with their ids, workers, ports and subdomains,
//! conf tokens; checked against what this database holds and written in one
//! transaction, each change in the change log like any other write (watch
//! streams and the Backend.AI publisher see them).
//!
//! An imported worker already holds its routes (the coordinator it served
//! told it), so a new worker is recorded as having acknowledged them all, and
//! `circuit_of` gives, per route, what its Backend.AI worker was told: the
//! bus state records it as published and acknowledged, and the publisher
//! sends nothing for the import. A route imported onto a worker this
//! database already had is published as usual (a created event the worker
//! acknowledges; re-sending what it holds is harmless).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::create_writer::insert::insert_statement;
use super::sql::{self, Arg};
use super::tx::WriteTx;
use super::{ConfToken, Result, Store, db_time, rows};
use crate::domain::events::ChangeKind;
use crate::domain::{
    AppMode, Revision, Route, StoredRoute, Worker, WorkerRegistration, WorkerStatus,
};

/// Routes per `INSERT` (15 values each: well under both backends' limits).
const ROUTES_PER_INSERT: usize = 500;

/// A worker taken over, with the id it had.
#[derive(Clone, Debug, PartialEq)]
pub struct ImportedWorker {
    pub id: Uuid,
    pub registration: WorkerRegistration,
    pub status: WorkerStatus,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// What to take over.
#[derive(Clone, Debug, Default)]
pub struct Import {
    pub workers: Vec<ImportedWorker>,
    /// Placed on one of `workers` (or a worker already here with that id).
    pub routes: Vec<StoredRoute>,
    pub tokens: Vec<ConfToken>,
}

/// How to take it over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportMode {
    /// Check and report; write nothing.
    pub dry_run: bool,
    /// Take over into a database holding routes of its own.
    pub merge: bool,
}

/// A row not taken over because this database holds something in its way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// `worker`, `route` or `token`.
    pub kind: &'static str,
    pub id: Uuid,
    pub reason: String,
}

/// New, already present (same id: left as it is) and in conflict, per kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub workers: (usize, usize),
    pub routes: (usize, usize),
    pub tokens: (usize, usize),
    pub conflicts: Vec<Conflict>,
    /// Routes this database holds that are not among those imported.
    pub own_routes: usize,
    /// Whether anything was written (not a dry run, nothing refused, something new).
    pub written: bool,
    /// The last revision written.
    pub revision: Option<Revision>,
}

/// What this database holds that an import may collide with.
#[derive(Default)]
struct Held {
    workers: HashMap<Uuid, String>,
    names: HashMap<String, Uuid>,
    routes: HashSet<Uuid>,
    ports: HashMap<(Uuid, u16), Uuid>,
    subdomains: HashMap<(Uuid, String), Uuid>,
    sessions: HashMap<(Uuid, String), Uuid>,
    endpoints: HashMap<Uuid, Uuid>,
}

type HeldRoute = (
    Uuid,
    String,
    Option<Uuid>,
    Option<Uuid>,
    String,
    Option<Uuid>,
    Option<i32>,
    Option<String>,
);

impl Held {
    async fn read(conn: &mut sql::Conn<'_>) -> Result<Held> {
        let mut held = Held::default();
        let workers: Vec<(Uuid, String)> =
            conn.fetch_all("SELECT id, name FROM workers", &[]).await?;
        for (id, name) in workers {
            held.names.insert(name.clone(), id);
            held.workers.insert(id, name);
        }
        let routes: Vec<HeldRoute> = conn
            .fetch_all(
                "SELECT id, app_mode, session_id, endpoint_id, service, worker_id, frontend_port, \
                 frontend_subdomain FROM routes",
                &[],
            )
            .await?;
        for (id, mode, session, endpoint, service, worker, port, subdomain) in routes {
            held.routes.insert(id);
            if let Some(w) = worker {
                if let Some(p) = port.and_then(|p| u16::try_from(p).ok()) {
                    held.ports.insert((w, p), id);
                }
                if let Some(s) = subdomain {
                    held.subdomains.insert((w, s), id);
                }
            }
            match (mode.as_str(), session, endpoint) {
                ("inference", _, Some(e)) => {
                    held.endpoints.insert(e, id);
                }
                (_, Some(s), _) => {
                    held.sessions.insert((s, service), id);
                }
                _ => {}
            }
        }
        Ok(held)
    }

    /// Why route `r` cannot be added, if it cannot; else adds it.
    fn take_route(&mut self, r: &StoredRoute) -> Option<String> {
        let worker = r.worker_id?;
        if let Some(p) = r.port
            && let Some(other) = self.ports.get(&(worker, p))
        {
            return Some(format!("port {p} of worker {worker} is route {other}'s"));
        }
        if let Some(s) = &r.subdomain
            && let Some(other) = self.subdomains.get(&(worker, s.clone()))
        {
            return Some(format!(
                "subdomain {s} of worker {worker} is route {other}'s"
            ));
        }
        match (r.spec.app_mode, r.spec.session_id, r.spec.endpoint_id) {
            (AppMode::Inference, _, Some(e)) => {
                if let Some(other) = self.endpoints.get(&e) {
                    return Some(format!("endpoint {e} already has route {other}"));
                }
                self.endpoints.insert(e, r.id);
            }
            (_, Some(s), _) => {
                let key = (s, r.spec.service.clone());
                if let Some(other) = self.sessions.get(&key) {
                    return Some(format!(
                        "app {} of session {s} already has route {other}",
                        r.spec.service
                    ));
                }
                self.sessions.insert(key, r.id);
            }
            _ => {}
        }
        if let Some(p) = r.port {
            self.ports.insert((worker, p), r.id);
        }
        if let Some(s) = &r.subdomain {
            self.subdomains.insert((worker, s.clone()), r.id);
        }
        self.routes.insert(r.id);
        None
    }
}

/// The rows of `import` to write: the workers, routes and tokens not here
/// yet, and the report (conflicts, counts).
fn plan<'i>(
    held: &mut Held,
    import: &'i Import,
    tokens_held: &HashSet<Uuid>,
) -> (
    Vec<&'i ImportedWorker>,
    Vec<&'i StoredRoute>,
    Vec<&'i ConfToken>,
    ImportReport,
) {
    let mut report = ImportReport::default();
    let imported: HashSet<Uuid> = import.routes.iter().map(|r| r.id).collect();
    report.own_routes = held
        .routes
        .iter()
        .filter(|id| !imported.contains(id))
        .count();
    let mut usable: HashSet<Uuid> = HashSet::new();
    let mut workers = Vec::new();
    for w in &import.workers {
        let name = &w.registration.name;
        let conflict = match (held.workers.get(&w.id), held.names.get(name)) {
            (Some(here), _) if here == name => {
                report.workers.1 += 1;
                usable.insert(w.id);
                continue;
            }
            (Some(here), _) => format!("id {} is worker {here:?} here", w.id),
            (None, Some(other)) => format!("authority {name:?} is worker {other} here"),
            (None, None) => {
                usable.insert(w.id);
                workers.push(w);
                continue;
            }
        };
        report.conflicts.push(Conflict {
            kind: "worker",
            id: w.id,
            reason: conflict,
        });
    }
    let mut routes = Vec::new();
    for r in &import.routes {
        if held.routes.contains(&r.id) {
            report.routes.1 += 1;
            continue;
        }
        let reason = match r.worker_id {
            Some(w) if !usable.contains(&w) => Some(format!("its worker {w} is not imported")),
            _ => held.take_route(r),
        };
        match reason {
            Some(reason) => report.conflicts.push(Conflict {
                kind: "route",
                id: r.id,
                reason,
            }),
            None => routes.push(r),
        }
    }
    let mut tokens = Vec::new();
    for t in &import.tokens {
        if tokens_held.contains(&t.id) {
            report.tokens.1 += 1;
        } else {
            tokens.push(t);
        }
    }
    report.workers.0 = workers.len();
    report.routes.0 = routes.len();
    report.tokens.0 = tokens.len();
    (workers, routes, tokens, report)
}

type BusRow = (Uuid, Uuid, String, serde_json::Value, Revision);

/// Inserts the new workers, each having acknowledged up to `acked` (what
/// the import's last route will be), and logs them. Answers their token
/// hashes (of tokens nobody has: a Backend.AI worker presents none).
async fn insert_workers(
    tx: &mut WriteTx<'_>,
    workers: &[&ImportedWorker],
    acked: Revision,
    now: DateTime<Utc>,
) -> Result<Vec<(Uuid, [u8; 32])>> {
    let mut hashes = Vec::with_capacity(workers.len());
    for w in workers {
        let hash: [u8; 32] = rand::random();
        hashes.push((w.id, hash));
        let created = db_time(w.created_at.unwrap_or(now));
        tx.conn()
            .execute(
                "INSERT INTO workers (id, name, spec, status, token_hash, last_heartbeat, \
                 acked_revision, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[
                    w.id.into(),
                    w.registration.name.as_str().into(),
                    Arg::json(&w.registration),
                    w.status.as_str().into(),
                    hash.as_slice().into(),
                    now.into(),
                    acked.into(),
                    created.into(),
                    db_time(w.updated_at.unwrap_or(created)).into(),
                ],
            )
            .await?;
    }
    let ids: Vec<Uuid> = workers.iter().map(|w| w.id).collect();
    for w in rows::workers_by_id(&mut tx.conn(), &ids).await? {
        let rev = tx.next_revision();
        tx.log(
            rev,
            ChangeKind::WorkerUpsert,
            None,
            Some(w.id),
            Arg::json(&w),
            now,
        );
    }
    Ok(hashes)
}

/// Inserts the routes, each at a revision of its own, and logs them.
/// Answers the bus rows of those on `new_workers` (published and
/// acknowledged: the worker holds them).
async fn insert_routes(
    tx: &mut WriteTx<'_>,
    routes: &[&StoredRoute],
    new_workers: &HashSet<Uuid>,
    now: DateTime<Utc>,
    circuit_of: impl Fn(&Route, &Worker) -> Option<serde_json::Value>,
) -> Result<Vec<BusRow>> {
    let on: Vec<Uuid> = routes
        .iter()
        .filter_map(|r| r.worker_id)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let placed_on: HashMap<Uuid, Worker> = rows::workers_by_id(&mut tx.conn(), &on)
        .await?
        .into_iter()
        .map(|w| (w.id, w))
        .collect();
    let mut stored = Vec::with_capacity(routes.len());
    let mut bus = Vec::new();
    for r in routes {
        let mut r = (*r).clone();
        r.revision = tx.next_revision();
        r.created_at = db_time(r.created_at);
        r.updated_at = db_time(r.updated_at);
        let worker = r.worker_id.and_then(|w| placed_on.get(&w));
        let wire = r.to_route(worker);
        tx.log(
            r.revision,
            ChangeKind::RouteUpsert,
            Some(r.id),
            r.worker_id,
            Arg::json(&wire),
            now,
        );
        if let Some(w) = worker.filter(|w| new_workers.contains(&w.id))
            && let Some(circuit) = circuit_of(&wire, w)
        {
            bus.push((r.id, w.id, w.name.clone(), circuit, r.revision));
        }
        stored.push((r, wire));
    }
    for chunk in stored.chunks(ROUTES_PER_INSERT) {
        let (query, args) = insert_statement(chunk, "");
        tx.conn().execute(sqlx::AssertSqlSafe(query), &args).await?;
    }
    Ok(bus)
}

async fn insert_bus(conn: &mut sql::Conn<'_>, bus: &[BusRow]) -> Result<()> {
    for (route, worker, authority, circuit, revision) in bus {
        conn.execute(
            "INSERT INTO bus_circuits (route_id, worker_id, authority, circuit, revision, acked) \
             VALUES ($1, $2, $3, $4, $5, 1) ON CONFLICT (route_id) DO UPDATE SET \
             worker_id = excluded.worker_id, authority = excluded.authority, \
             circuit = excluded.circuit, revision = excluded.revision, acked = 1",
            &[
                (*route).into(),
                (*worker).into(),
                authority.as_str().into(),
                Arg::json(circuit),
                (*revision).into(),
            ],
        )
        .await?;
    }
    Ok(())
}

async fn insert_tokens(conn: &mut sql::Conn<'_>, tokens: &[&ConfToken]) -> Result<()> {
    for t in tokens {
        conn.execute(
            "INSERT INTO backendai_conf_tokens (id, login_session_token, kernel_host, \
             kernel_port, session_id, user_uuid, group_id, access_key, domain_name, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            &[
                t.id.into(),
                t.login_session_token.as_deref().into(),
                t.kernel_host.as_str().into(),
                t.kernel_port.into(),
                t.session_id.into(),
                t.user_uuid.into(),
                t.group_id.into(),
                t.access_key.as_str().into(),
                t.domain_name.as_str().into(),
                db_time(t.created_at).into(),
            ],
        )
        .await?;
    }
    Ok(())
}

impl Store {
    /// Takes `import` over: checks it against this database and, unless
    /// `mode` says a dry run or this database holds routes of its own and
    /// `mode` is no merge, writes what is new in one transaction. Rows with
    /// an id already here are left as they are; rows in conflict are
    /// reported, not written. `circuit_of` is what a Backend.AI worker was
    /// told of a route (its `SerializableCircuit`).
    pub async fn import(
        &self,
        import: &Import,
        mode: ImportMode,
        now: DateTime<Utc>,
        circuit_of: impl Fn(&Route, &Worker) -> Option<serde_json::Value>,
    ) -> Result<ImportReport> {
        let now = db_time(now);
        let mut tx = self.write().await?;
        let mut held = Held::read(&mut tx.conn()).await?;
        let tokens_held: Vec<(Uuid,)> = tx
            .conn()
            .fetch_all("SELECT id FROM backendai_conf_tokens", &[])
            .await?;
        let tokens_held = tokens_held.into_iter().map(|(id,)| id).collect();
        let (workers, routes, tokens, mut report) = plan(&mut held, import, &tokens_held);
        let refused = report.own_routes > 0 && !mode.merge;
        let nothing = workers.is_empty() && routes.is_empty() && tokens.is_empty();
        if mode.dry_run || refused || nothing {
            tx.rollback().await?;
            return Ok(report);
        }
        let last = tx.head() + (workers.len() + routes.len()) as Revision;
        let hashes = insert_workers(&mut tx, &workers, last, now).await?;
        let new_workers: HashSet<Uuid> = workers.iter().map(|w| w.id).collect();
        let bus = insert_routes(&mut tx, &routes, &new_workers, now, circuit_of).await?;
        insert_bus(&mut tx.conn(), &bus).await?;
        insert_tokens(&mut tx.conn(), &tokens).await?;
        let revision = tx.commit().await?;
        for (id, hash) in hashes {
            self.tokens.put(id, Some(hash.to_vec()));
        }
        report.written = true;
        report.revision = Some(revision);
        Ok(report)
    }
}
