//! The way back (`appproxy-coordinator export-backendai --to <upstream
//! PostgreSQL URL>`): this coordinator's Backend.AI state written into a
//! Backend.AI App Proxy coordinator 26.9.x's schema, so the upstream
//! coordinator, started on that database at the same address, serves every
//! URL the Manager and the users hold, and its workers' ids, ports and
//! subdomains are what the running workers already have.
//!
//! [`rows`] turns our workers, circuits and conf tokens into upstream's rows
//! (pure; the enum members come from the one table in [`super::map`]);
//! [`export_backendai`] writes them into an *empty* upstream database made
//! by upstream's own migrations (`schema oneshot`), after the same alembic
//! revision check as the import, in one transaction. A database holding any
//! worker, circuit, endpoint, token or app filter is refused: merging into a
//! live upstream could hand one port or subdomain to two circuits. Routes
//! created through the native API and native workers have no place in
//! upstream's schema: they are counted and left out.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{ConnectOptions, PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::map::{app_mode_name, frontend_name, protocol_name, status_name};
use super::read::{self, UpstreamCircuit, UpstreamEndpoint, UpstreamToken, UpstreamWorker};
use super::{progress, shown};
use crate::backendai::circuit::Circuit;
use crate::domain::{AppMode, BackendAiWorker, Route, Worker, WorkerFrontend};
use crate::store::{ExportState, Store};

/// A worker row as upstream keeps it, with its slot counters.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportedWorker {
    pub row: UpstreamWorker,
    /// Ports in its range; `-1` for a wildcard worker (as upstream counts).
    pub available_slots: i32,
    /// The circuits exported onto it.
    pub occupied_slots: i32,
}

/// One of ours upstream's schema gets nothing of, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// `worker`, `circuit`.
    pub kind: &'static str,
    pub id: Uuid,
    pub reason: String,
}

/// Upstream's rows for our state.
#[derive(Clone, Debug, Default)]
pub struct Exported {
    pub workers: Vec<ExportedWorker>,
    pub circuits: Vec<UpstreamCircuit>,
    pub endpoints: Vec<UpstreamEndpoint>,
    pub tokens: Vec<UpstreamToken>,
    /// Routes created through the native API (no circuit): not exported.
    pub native_routes: usize,
    /// Native workers (registered with `POST /workers/register`): not exported.
    pub native_workers: usize,
    /// Circuits and workers that cannot be upstream's, with the reason.
    pub skipped: Vec<Skipped>,
}

fn port_i32(p: u16) -> i32 {
    i32::from(p)
}

/// Backend.AI worker `w` as upstream's row.
pub fn worker_row(w: &Worker, bai: &BackendAiWorker) -> Result<ExportedWorker, String> {
    let (mode, port_range, wildcard_domain, wildcard_traffic_port, available_slots) =
        match &w.frontend {
            WorkerFrontend::Port { port_range, .. } => (
                "port",
                Some(vec![port_i32(port_range[0]), port_i32(port_range[1])]),
                None,
                None,
                port_i32(port_range[1]) - port_i32(port_range[0]) + 1,
            ),
            WorkerFrontend::Wildcard { domain, port, .. } => (
                "wildcard",
                None,
                Some(format!(".{domain}")),
                Some(port_i32(*port)),
                -1,
            ),
        };
    let protocol = w.protocols.first().map_or("http", |p| p.as_str());
    Ok(ExportedWorker {
        row: UpstreamWorker {
            id: w.id,
            authority: w.name.clone(),
            frontend_mode: frontend_name(mode)
                .expect("both modes are in the table")
                .to_owned(),
            protocol: protocol_name(protocol)
                .ok_or_else(|| format!("protocol {protocol:?} has no upstream member"))?
                .to_owned(),
            hostname: bai.hostname.clone(),
            tls_listen: bai.tls_listen,
            tls_advertised: bai.tls_advertised,
            api_port: port_i32(bai.api_port),
            port_range,
            wildcard_domain,
            wildcard_traffic_port,
            nodes: i32::try_from(bai.nodes).unwrap_or(i32::MAX),
            accepted_traffics: w
                .app_modes
                .iter()
                .map(|m| app_mode_name(*m).to_owned())
                .collect(),
            filtered_apps_only: bai.filtered_apps_only,
            traefik_last_used_marker_path: bai.traefik_last_used_marker_path.clone(),
            created_at: Some(w.created_at),
            updated_at: Some(w.updated_at),
            status: status_name(w.status).to_owned(),
            filters: bai
                .app_filters
                .iter()
                .map(|f| (f.key.clone(), f.value.clone()))
                .collect(),
        },
        available_slots,
        occupied_slots: 0,
    })
}

/// Backend.AI circuit `r`, on Backend.AI worker `w`, as upstream's row.
pub fn circuit_row(r: &Route, w: &Worker) -> Result<UpstreamCircuit, String> {
    let info = r.circuit.as_ref().ok_or("not a Backend.AI circuit")?;
    let c = Circuit::of(r, w);
    if c.port.is_none() && c.subdomain.is_none() {
        return Err(format!(
            "it has no {} on worker {}",
            if c.frontend_mode == "port" {
                "port"
            } else {
                "subdomain"
            },
            w.name
        ));
    }
    let asked = info.app_protocol.as_deref().unwrap_or(r.protocol.as_str());
    Ok(UpstreamCircuit {
        id: c.id,
        app: Some(c.app.clone()),
        protocol: protocol_name(asked)
            .ok_or_else(|| format!("protocol {asked:?} has no upstream member"))?
            .to_owned(),
        worker: w.id,
        app_mode: app_mode_name(r.app_mode).to_owned(),
        frontend_mode: frontend_name(&c.frontend_mode)
            .expect("both modes are in the table")
            .to_owned(),
        port: c.port.map(port_i32),
        subdomain: c.subdomain.clone(),
        envs: Some(Json(
            serde_json::to_value(&c.envs).map_err(|e| e.to_string())?,
        )),
        arguments: c.arguments.clone(),
        open_to_public: c.open_to_public,
        allowed_client_ips: c.allowed_client_ips.clone(),
        user_id: c.user_id,
        endpoint_id: c.endpoint_id,
        runtime_variant: c.runtime_variant.clone(),
        session_ids: c.session_ids.clone(),
        route_info: Json(serde_json::to_value(&c.route_info).map_err(|e| e.to_string())?),
        created_at: Some(r.created_at),
        updated_at: Some(r.updated_at),
    })
}

/// Our state as upstream's rows (see the module documentation).
pub fn rows(state: &ExportState) -> Exported {
    let mut out = Exported::default();
    let mut index: HashMap<Uuid, usize> = HashMap::new();
    let by_id: HashMap<Uuid, &Worker> = state.workers.iter().map(|w| (w.id, w)).collect();
    for w in &state.workers {
        let Some(bai) = &w.backendai else {
            out.native_workers += 1;
            continue;
        };
        match worker_row(w, bai) {
            Ok(row) => {
                index.insert(w.id, out.workers.len());
                out.workers.push(row);
            }
            Err(reason) => out.skipped.push(Skipped {
                kind: "worker",
                id: w.id,
                reason,
            }),
        }
    }
    let mut endpoints: BTreeMap<Uuid, UpstreamEndpoint> = BTreeMap::new();
    for r in &state.routes {
        let Some(info) = &r.circuit else {
            out.native_routes += 1;
            continue;
        };
        let on = r.worker_id.and_then(|id| by_id.get(&id).copied());
        let result = match on {
            None => Err("it waits for a worker (Pending): upstream has no such state".to_owned()),
            Some(w) if !index.contains_key(&w.id) => {
                Err(format!("its worker {} is not exported", w.name))
            }
            Some(w) => circuit_row(r, w),
        };
        match result {
            Ok(row) => {
                if let Some(i) = index.get(&row.worker) {
                    out.workers[*i].occupied_slots += 1;
                }
                if let (AppMode::Inference, Some(e)) = (r.app_mode, r.endpoint_id) {
                    endpoints.insert(
                        e,
                        UpstreamEndpoint {
                            id: e,
                            health_check_enabled: info.health_check.is_some(),
                            health_check_config: info.health_check.clone().map(Json),
                        },
                    );
                }
                out.circuits.push(row);
            }
            Err(reason) => out.skipped.push(Skipped {
                kind: "circuit",
                id: r.id,
                reason,
            }),
        }
    }
    out.endpoints = endpoints.into_values().collect();
    out.tokens = state
        .tokens
        .iter()
        .map(|t| UpstreamToken {
            id: t.id,
            login_session_token: t.login_session_token.clone(),
            kernel_host: t.kernel_host.clone(),
            kernel_port: port_i32(t.kernel_port),
            session_id: t.session_id,
            user_uuid: t.user_uuid,
            group_id: t.group_id,
            access_key: t.access_key.clone(),
            domain_name: t.domain_name.clone(),
        })
        .collect();
    out
}

/// Connects to upstream's database (`postgres://…`) to write.
async fn connect(url: &str) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url
        .parse()
        .context("--to: not a PostgreSQL URL (postgres://user:password@host:port/database)")?;
    PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.disable_statement_logging())
        .await
        .context("connecting to upstream's database")
}

/// Rows already in upstream's tables, per table (all zero: empty).
async fn rows_held(pool: &PgPool) -> anyhow::Result<Vec<(&'static str, i64)>> {
    let mut held = Vec::new();
    for table in [
        "workers",
        "worker_app_filters",
        "circuits",
        "endpoints",
        "tokens",
    ] {
        let (n,): (i64,) =
            sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                .fetch_one(pool)
                .await
                .with_context(|| format!("counting upstream's {table}"))?;
        held.push((table, n));
    }
    Ok(held)
}

async fn insert_workers(
    tx: &mut Transaction<'_, Postgres>,
    workers: &[ExportedWorker],
) -> anyhow::Result<usize> {
    let mut filters = 0;
    for w in workers {
        let r = &w.row;
        sqlx::query(
            "INSERT INTO workers (id, authority, frontend_mode, protocol, hostname, tls_listen, \
             tls_advertised, api_port, available_slots, occupied_slots, port_range, \
             wildcard_domain, wildcard_traffic_port, nodes, accepted_traffics, \
             filtered_apps_only, traefik_last_used_marker_path, created_at, updated_at, status) \
             VALUES ($1, $2, $3::text::frontendmode, $4::text::proxyprotocol, $5, $6, $7, $8, \
             $9, $10, $11, $12, $13, $14, $15::text[]::appmode[], $16, $17, $18, $19, $20)",
        )
        .bind(r.id)
        .bind(&r.authority)
        .bind(&r.frontend_mode)
        .bind(&r.protocol)
        .bind(&r.hostname)
        .bind(r.tls_listen)
        .bind(r.tls_advertised)
        .bind(r.api_port)
        .bind(w.available_slots)
        .bind(w.occupied_slots)
        .bind(&r.port_range)
        .bind(&r.wildcard_domain)
        .bind(r.wildcard_traffic_port)
        .bind(r.nodes)
        .bind(&r.accepted_traffics)
        .bind(r.filtered_apps_only)
        .bind(&r.traefik_last_used_marker_path)
        .bind(r.created_at)
        .bind(r.updated_at)
        .bind(&r.status)
        .execute(&mut **tx)
        .await
        .with_context(|| format!("writing worker {} ({})", r.id, r.authority))?;
        for (name, value) in &r.filters {
            sqlx::query(
                "INSERT INTO worker_app_filters (id, property_name, property_value, worker) \
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(Uuid::new_v4())
            .bind(name)
            .bind(value)
            .bind(r.id)
            .execute(&mut **tx)
            .await
            .with_context(|| format!("writing an app filter of worker {}", r.id))?;
            filters += 1;
        }
    }
    Ok(filters)
}

async fn insert_circuits(
    tx: &mut Transaction<'_, Postgres>,
    circuits: &[UpstreamCircuit],
) -> anyhow::Result<()> {
    for c in circuits {
        sqlx::query(
            "INSERT INTO circuits (id, app, protocol, worker, app_mode, frontend_mode, port, \
             subdomain, envs, arguments, open_to_public, allowed_client_ips, user_id, \
             endpoint_id, runtime_variant, session_ids, route_info, created_at, updated_at) \
             VALUES ($1, $2, $3::text::proxyprotocol, $4, $5::text::appmode, \
             $6::text::frontendmode, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)",
        )
        .bind(c.id)
        .bind(&c.app)
        .bind(&c.protocol)
        .bind(c.worker)
        .bind(&c.app_mode)
        .bind(&c.frontend_mode)
        .bind(c.port)
        .bind(&c.subdomain)
        .bind(&c.envs)
        .bind(&c.arguments)
        .bind(c.open_to_public)
        .bind(&c.allowed_client_ips)
        .bind(c.user_id)
        .bind(c.endpoint_id)
        .bind(&c.runtime_variant)
        .bind(&c.session_ids)
        .bind(&c.route_info)
        .bind(c.created_at)
        .bind(c.updated_at)
        .execute(&mut **tx)
        .await
        .with_context(|| format!("writing circuit {}", c.id))?;
    }
    Ok(())
}

async fn insert_endpoints_and_tokens(
    tx: &mut Transaction<'_, Postgres>,
    endpoints: &[UpstreamEndpoint],
    tokens: &[UpstreamToken],
) -> anyhow::Result<()> {
    for e in endpoints {
        sqlx::query(
            "INSERT INTO endpoints (id, health_check_enabled, health_check_config) \
             VALUES ($1, $2, $3)",
        )
        .bind(e.id)
        .bind(e.health_check_enabled)
        .bind(&e.health_check_config)
        .execute(&mut **tx)
        .await
        .with_context(|| format!("writing endpoint {}", e.id))?;
    }
    for t in tokens {
        sqlx::query(
            "INSERT INTO tokens (id, login_session_token, kernel_host, kernel_port, session_id, \
             user_uuid, group_id, access_key, domain_name) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(t.id)
        .bind(&t.login_session_token)
        .bind(&t.kernel_host)
        .bind(t.kernel_port)
        .bind(t.session_id)
        .bind(t.user_uuid)
        .bind(t.group_id)
        .bind(&t.access_key)
        .bind(&t.domain_name)
        .execute(&mut **tx)
        .await
        .with_context(|| format!("writing conf token {}", t.id))?;
    }
    Ok(())
}

/// What an export did.
#[derive(Clone, Debug, Default)]
pub struct ExportOutcome {
    pub exported: Exported,
    /// Whether the rows were committed (not a dry run).
    pub written: bool,
}

/// Writes `store`'s Backend.AI state (conf tokens younger than
/// `conf_token_ttl`) into upstream's empty database at `to`, in one
/// transaction; with `dry_run` the same statements run and are rolled back.
/// Fails, writing nothing, on an unknown schema revision, on a database that
/// is not empty, or on any database error.
pub async fn export_backendai(
    store: &Store,
    to: &str,
    dry_run: bool,
    now: DateTime<Utc>,
    conf_token_ttl: std::time::Duration,
    out: &mut impl Write,
) -> anyhow::Result<ExportOutcome> {
    progress(&format!("reading {}", store.backend()));
    let state = store.export_state(now, conf_token_ttl).await?;
    let exported = rows(&state);
    writeln!(
        out,
        "this coordinator: {} workers, {} routes, {} conf tokens in use",
        state.workers.len(),
        state.routes.len(),
        state.tokens.len()
    )?;
    for s in &exported.skipped {
        writeln!(out, "skipped {} {}: {}", s.kind, s.id, s.reason)?;
    }
    writeln!(
        out,
        "not exported: {} native routes and {} native workers (upstream's schema has no place \
         for them), {} skipped",
        exported.native_routes,
        exported.native_workers,
        exported.skipped.len()
    )?;
    progress(&format!("connecting to {}", shown(to)));
    let pool = connect(to).await?;
    let result = write(&pool, &exported, dry_run, to, out).await;
    pool.close().await;
    let written = result?;
    Ok(ExportOutcome { exported, written })
}

async fn write(
    pool: &PgPool,
    exported: &Exported,
    dry_run: bool,
    to: &str,
    out: &mut impl Write,
) -> anyhow::Result<bool> {
    let revision = read::check_revision(pool).await?;
    let held: Vec<String> = rows_held(pool)
        .await?
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(table, n)| format!("{n} {table}"))
        .collect();
    if !held.is_empty() {
        bail!(
            "upstream's database {} is not empty ({}): export-backendai writes only into an \
             empty database made by upstream's own migrations (`backend.ai app-proxy-coordinator \
             schema oneshot`), nothing written",
            shown(to),
            held.join(", ")
        );
    }
    let mut tx = pool.begin().await?;
    progress(&format!(
        "writing {} workers, {} circuits",
        exported.workers.len(),
        exported.circuits.len()
    ));
    let filters = insert_workers(&mut tx, &exported.workers).await?;
    insert_circuits(&mut tx, &exported.circuits).await?;
    insert_endpoints_and_tokens(&mut tx, &exported.endpoints, &exported.tokens).await?;
    let counts = format!(
        "{} workers, {} app filters, {} circuits, {} endpoints, {} conf tokens",
        exported.workers.len(),
        filters,
        exported.circuits.len(),
        exported.endpoints.len(),
        exported.tokens.len()
    );
    if dry_run {
        tx.rollback().await?;
        writeln!(
            out,
            "dry run: {counts} would be written into {} at alembic revision {revision} \
             (checked in a transaction rolled back: nothing written)",
            shown(to)
        )?;
        return Ok(false);
    }
    tx.commit().await?;
    writeln!(
        out,
        "exported into {} at alembic revision {revision} in one transaction: {counts}",
        shown(to)
    )?;
    Ok(true)
}

#[cfg(test)]
#[path = "export_tests.rs"]
mod tests;
