//! Worker rows: registration, heartbeats, status transitions, and counts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::rows::{self, route_columns, worker_select};
use super::sql::{self, Arg};
use super::{Counts, Registered, Result, Store, StoreError, db_time};
use crate::domain::events::ChangeKind;
use crate::domain::health::{Observation, PodState, next_status_with_pod, registered_status};
use crate::domain::worker::may_register;
use crate::domain::{
    Revision, RouteStatus, ValidationError, Worker, WorkerRegistration, WorkerStatus, validate,
};

/// Whether two pod references name one pod: the same uid when both have
/// one, else the same namespace and name.
fn same_pod(a: Option<&crate::domain::PodRef>, b: Option<&crate::domain::PodRef>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => match (&a.uid, &b.uid) {
            (Some(x), Some(y)) => x == y,
            _ => a.namespace == b.namespace && a.name == b.name,
        },
        _ => false,
    }
}

/// What Kubernetes last said about worker `id`'s pod.
async fn pod_state_of(conn: &mut sql::Conn<'_>, id: Uuid) -> Result<Option<PodState>> {
    let row: Option<(Option<String>,)> = conn
        .fetch_optional("SELECT pod_state FROM workers WHERE id = $1", &[id.into()])
        .await?;
    Ok(row.and_then(|(s,)| s).as_deref().and_then(PodState::parse))
}

/// A worker's status change, as applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub from: WorkerStatus,
    pub worker: Worker,
}

impl Store {
    /// Registers a worker, or re-registers it by name (same id, routes
    /// kept) when [`may_register`] allows it; `as_worker` is the worker whose
    /// own token the caller presented (`None`: the bootstrap token).
    /// `mint_token` is given the worker's id and answers the hash of its new token.
    pub async fn register_worker(
        &self,
        registration: WorkerRegistration,
        as_worker: Option<Uuid>,
        now: DateTime<Utc>,
        mint_token: impl FnOnce(Uuid) -> [u8; 32],
    ) -> Result<Registered> {
        let now = db_time(now);
        validate::registration(&registration)?;
        let mut tx = self.write().await?;
        let existing = rows::workers(
            &mut tx.conn(),
            concat!(worker_select!(), " WHERE w.name = $1"),
            &[registration.name.as_str().into()],
        )
        .await?
        .pop();
        may_register(existing.as_ref(), &registration, as_worker)?;
        // What Kubernetes said about the pod still holds when the worker
        // re-registers from the same pod; a new pod starts unknown.
        let pod_state = match &existing {
            Some(w) if same_pod(w.pod.as_ref(), registration.pod.as_ref()) => {
                pod_state_of(&mut tx.conn(), w.id).await?
            }
            _ => None,
        };
        let status = registered_status(pod_state);
        let existing = existing.map(|w| w.id);
        let id = existing.unwrap_or_else(Uuid::now_v7);
        let token_hash = mint_token(id);
        let sql = match existing {
            Some(_) => {
                "UPDATE workers SET spec = $3, status = $6, token_hash = $4, \
                 last_heartbeat = $5, updated_at = $5, pod_state = $7 WHERE id = $1"
            }
            None => {
                "INSERT INTO workers (id, name, spec, status, token_hash, last_heartbeat, \
                 acked_revision, created_at, updated_at, pod_state) \
                 VALUES ($1, $2, $3, $6, $4, $5, 0, $5, $5, $7)"
            }
        };
        tx.conn()
            .execute(
                sql,
                &[
                    id.into(),
                    registration.name.as_str().into(),
                    Arg::json(&registration),
                    token_hash.as_slice().into(),
                    now.into(),
                    status.as_str().into(),
                    pod_state.map(PodState::as_str).into(),
                ],
            )
            .await?;
        if existing.is_some() && status != WorkerStatus::Lost {
            super::moves::clear_stranded(&mut tx.conn(), id).await?;
        }
        let worker = rows::worker(&mut tx.conn(), id)
            .await?
            .ok_or(StoreError::NotFound)?;
        let rev = tx.next_revision();
        tx.log(
            rev,
            ChangeKind::WorkerUpsert,
            None,
            Some(id),
            Arg::json(&worker),
            now,
        );
        let routes = rows::routes(
            &mut tx.conn(),
            concat!(
                "SELECT ",
                route_columns!(),
                " FROM routes WHERE worker_id = $1 ORDER BY id"
            ),
            &[id.into()],
        )
        .await?
        .into_iter()
        .map(|r| r.into_route(Some(&worker)))
        .collect();
        tx.commit().await?;
        self.tokens.put(id, Some(token_hash.to_vec()));
        Ok(Registered {
            worker,
            created: existing.is_none(),
            revision: rev,
            routes,
        })
    }

    /// SHA-256 of the worker's current token, `None` for an unknown worker.
    ///
    /// Every request with a per-worker token asks this, so answers are kept
    /// for [`TOKEN_CACHE_TTL`] (a token replaced or revoked through another
    /// replica stops working after at most that long; through this one, at
    /// once), unknown ids included, and one read runs at a time (so
    /// concurrent requests for one id read it once): a flood of made-up
    /// tokens waits its turn instead of loading the database.
    pub async fn worker_token_hash(&self, id: Uuid) -> Result<Option<Vec<u8>>> {
        if let Some(hash) = self.tokens.get(id) {
            return Ok(hash);
        }
        let _permit = self
            .tokens
            .reads
            .acquire()
            .await
            .expect("the semaphore is never closed");
        if let Some(hash) = self.tokens.get(id) {
            return Ok(hash);
        }
        self.tokens.reads_total.inc();
        let mut c = sql::acquire(&self.db).await?;
        let hash: Option<(Vec<u8>,)> = c
            .conn()
            .fetch_optional("SELECT token_hash FROM workers WHERE id = $1", &[id.into()])
            .await?;
        let hash = hash.map(|(h,)| h);
        self.tokens.put(id, hash.clone());
        Ok(hash)
    }

    /// Records a heartbeat and the revision the worker has applied; answers
    /// the worker's status and the current revision. (What a heartbeat does to
    /// the status is `health::observe`'s business.)
    pub async fn heartbeat(
        &self,
        id: Uuid,
        acked_revision: Revision,
        now: DateTime<Utc>,
    ) -> Result<(WorkerStatus, Revision)> {
        let now = db_time(now);
        let current = self.current_revision().await?;
        if acked_revision < 0 || acked_revision > current {
            return Err(StoreError::Invalid(ValidationError {
                field: "acked_revision".into(),
                message: format!(
                    "{acked_revision} is not a revision this coordinator has issued (current: {current})"
                ),
            }));
        }
        let mut c = sql::acquire(&self.db).await?;
        let status: Option<(String,)> = c
            .conn()
            .fetch_optional(
                "UPDATE workers SET last_heartbeat = $2, \
                 acked_revision = CASE WHEN acked_revision < $3 THEN $3 ELSE acked_revision END \
                 WHERE id = $1 RETURNING status",
                &[id.into(), now.into(), acked_revision.into()],
            )
            .await?;
        let status = status
            .and_then(|(s,)| WorkerStatus::parse(&s))
            .ok_or(StoreError::NotFound)?;
        Ok((status, current))
    }

    /// Applies `observation` to worker `id` by the rules of
    /// [`next_status`], reading and writing the status in one write
    /// transaction, so a concurrent change (say to `Draining`) is never
    /// overwritten by a decision taken from an older status. `None` when the
    /// status stays.
    pub async fn observe_worker(
        &self,
        id: Uuid,
        observation: Observation,
        now: DateTime<Utc>,
    ) -> Result<Option<Transition>> {
        let mut tx = self.write().await?;
        let worker = rows::worker(&mut tx.conn(), id)
            .await?
            .ok_or(StoreError::NotFound)?;
        let pod = match PodState::of(observation) {
            Some(reported) => {
                tx.conn()
                    .execute(
                        "UPDATE workers SET pod_state = $2 WHERE id = $1",
                        &[id.into(), reported.as_str().into()],
                    )
                    .await?;
                Some(reported)
            }
            None => pod_state_of(&mut tx.conn(), id).await?,
        };
        let Some(next) = next_status_with_pod(worker.status, pod, observation) else {
            tx.commit().await?;
            return Ok(None);
        };
        let from = worker.status;
        let worker = self.write_status(&mut tx, worker, next, now).await?;
        tx.commit().await?;
        Ok(Some(Transition { from, worker }))
    }

    /// Sets a worker's status whatever it was (a logged worker mutation).
    /// No-op if unchanged.
    pub async fn set_worker_status(
        &self,
        id: Uuid,
        status: WorkerStatus,
        now: DateTime<Utc>,
    ) -> Result<Worker> {
        let mut tx = self.write().await?;
        let worker = rows::worker(&mut tx.conn(), id)
            .await?
            .ok_or(StoreError::NotFound)?;
        if worker.status == status {
            return Ok(worker);
        }
        let worker = self.write_status(&mut tx, worker, status, now).await?;
        tx.commit().await?;
        Ok(worker)
    }

    async fn write_status(
        &self,
        tx: &mut super::tx::WriteTx<'_>,
        mut worker: Worker,
        status: WorkerStatus,
        now: DateTime<Utc>,
    ) -> Result<Worker> {
        let now = db_time(now);
        tx.conn()
            .execute(
                "UPDATE workers SET status = $2, updated_at = $3 WHERE id = $1",
                &[worker.id.into(), status.as_str().into(), now.into()],
            )
            .await?;
        if status != WorkerStatus::Lost {
            super::moves::clear_stranded(&mut tx.conn(), worker.id).await?;
        }
        worker.status = status;
        worker.updated_at = now;
        let rev = tx.next_revision();
        tx.log(
            rev,
            ChangeKind::WorkerUpsert,
            None,
            Some(worker.id),
            Arg::json(&worker),
            now,
        );
        Ok(worker)
    }

    pub async fn get_worker(&self, id: Uuid) -> Result<Worker> {
        let mut c = sql::acquire(&self.db).await?;
        rows::worker(&mut c.conn(), id)
            .await?
            .ok_or(StoreError::NotFound)
    }

    /// The worker named `name` (a Backend.AI worker's authority), if any.
    pub async fn worker_by_name(&self, name: &str) -> Result<Option<Worker>> {
        let mut c = sql::acquire(&self.db).await?;
        Ok(rows::workers(
            &mut c.conn(),
            concat!(worker_select!(), " WHERE w.name = $1"),
            &[name.into()],
        )
        .await?
        .pop())
    }

    /// One node of Backend.AI worker `id` deregistered (`DELETE
    /// /api/worker/{id}`): its `nodes` count goes down by one, never below
    /// zero (a logged worker mutation; the status is left to the caller).
    /// `NotFound` for an unknown worker or one that is not a Backend.AI worker.
    pub async fn backendai_node_left(&self, id: Uuid, now: DateTime<Utc>) -> Result<Worker> {
        let now = db_time(now);
        let mut tx = self.write().await?;
        let mut worker = rows::worker(&mut tx.conn(), id)
            .await?
            .ok_or(StoreError::NotFound)?;
        let Some(bai) = worker.backendai.as_mut() else {
            return Err(StoreError::NotFound);
        };
        bai.nodes = bai.nodes.saturating_sub(1);
        let spec = WorkerRegistration {
            name: worker.name.clone(),
            api_url: worker.api_url.clone(),
            frontend: worker.frontend.clone(),
            protocols: worker.protocols.clone(),
            app_modes: worker.app_modes.clone(),
            labels: worker.labels.clone(),
            pod: worker.pod.clone(),
            capacity: worker.capacity,
            backendai: worker.backendai.clone(),
        };
        tx.conn()
            .execute(
                "UPDATE workers SET spec = $2 WHERE id = $1",
                &[id.into(), Arg::json(&spec)],
            )
            .await?;
        let rev = tx.next_revision();
        tx.log(
            rev,
            ChangeKind::WorkerUpsert,
            None,
            Some(id),
            Arg::json(&worker),
            now,
        );
        tx.commit().await?;
        Ok(worker)
    }

    pub async fn list_workers(&self) -> Result<Vec<Worker>> {
        let mut c = sql::acquire(&self.db).await?;
        let mut workers = rows::workers(&mut c.conn(), worker_select!(), &[]).await?;
        workers.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(workers)
    }

    /// Workers in one of `statuses` whose last heartbeat is older than `cutoff`.
    pub async fn silent_workers(
        &self,
        statuses: &[WorkerStatus],
        cutoff: DateTime<Utc>,
    ) -> Result<Vec<Uuid>> {
        if statuses.is_empty() {
            return Ok(Vec::new());
        }
        let mut args: Vec<Arg> = vec![db_time(cutoff).into()];
        args.extend(statuses.iter().map(|s| s.as_str().into()));
        let query = format!(
            "SELECT id FROM workers WHERE last_heartbeat < $1 AND status IN ({}) ORDER BY id",
            sql::list(statuses.len(), 2)
        );
        let mut c = sql::acquire(&self.db).await?;
        let ids: Vec<(uuid::Uuid,)> = c
            .conn()
            .fetch_all(sqlx::AssertSqlSafe(query), &args)
            .await?;
        Ok(ids.into_iter().map(|(id,)| id).collect())
    }

    /// Workers that are `Lost` and still hold routes (whether they fail over
    /// now is [`crate::domain::failover::is_due`]'s decision).
    pub async fn lost_workers_with_routes(&self) -> Result<Vec<Worker>> {
        let mut c = sql::acquire(&self.db).await?;
        rows::workers(
            &mut c.conn(),
            concat!(
                worker_select!(),
                " WHERE w.status = 'Lost' AND w.route_count > 0 AND EXISTS \
                 (SELECT 1 FROM routes r WHERE r.worker_id = w.id AND r.stranded_reason IS NULL) \
                 ORDER BY w.id"
            ),
            &[],
        )
        .await
    }

    /// Route and worker counts by status. Routes are counted by the facts
    /// their status follows from, and [`RouteStatus::derive`] names each
    /// group, so a scrape does not read every route.
    pub async fn counts(&self) -> Result<Counts> {
        let mut c = sql::acquire(&self.db).await?;
        let groups: Vec<(Option<String>, i32, i64)> = c
            .conn()
            .fetch_all(
                "SELECT w.status, CASE WHEN w.acked_revision >= r.revision THEN 1 ELSE 0 END, COUNT(*) \
                 FROM routes r LEFT JOIN workers w ON w.id = r.worker_id GROUP BY 1, 2",
                &[],
            )
            .await?;
        let workers: Vec<(String, i64)> = c
            .conn()
            .fetch_all("SELECT status, COUNT(*) FROM workers GROUP BY status", &[])
            .await?;
        let (stranded,): (i64,) = c
            .conn()
            .fetch_one(
                "SELECT COUNT(*) FROM routes r JOIN workers w ON w.id = r.worker_id \
                 WHERE r.stranded_reason IS NOT NULL AND w.status = 'Lost'",
                &[],
            )
            .await?;
        let mut counts = Counts {
            stranded,
            ..Counts::default()
        };
        for (status, acked, n) in groups {
            let worker = status
                .as_deref()
                .and_then(WorkerStatus::parse)
                .map(|s| (s, acked == 1));
            *counts
                .routes
                .entry(RouteStatus::derive(worker))
                .or_default() += n;
        }
        for (status, n) in workers {
            if let Some(s) = WorkerStatus::parse(&status) {
                counts.workers.insert(s, n);
            }
        }
        Ok(counts)
    }
}

/// How long a worker's token hash is taken from memory.
pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(5);
/// Most token hashes (or unknown ids) kept.
const TOKEN_CACHE_MAX: usize = 10_000;

type TokenHash = Option<Vec<u8>>;

/// Recently read worker token hashes (see [`Store::worker_token_hash`]).
#[derive(Debug)]
pub(super) struct TokenCache {
    /// A worker's token hash (`None`: no such worker) and when it was read.
    entries: Mutex<HashMap<Uuid, (TokenHash, Instant)>>,
    reads: Semaphore,
    /// Token hashes read from the database, for `/metrics`.
    pub(super) reads_total: Counter,
}

impl Default for TokenCache {
    fn default() -> TokenCache {
        TokenCache {
            entries: Mutex::default(),
            reads: Semaphore::new(1),
            reads_total: Counter::default(),
        }
    }
}

impl TokenCache {
    fn get(&self, id: Uuid) -> Option<Option<Vec<u8>>> {
        let entries = self.entries.lock().expect("token cache");
        entries
            .get(&id)
            .filter(|(_, at)| at.elapsed() < TOKEN_CACHE_TTL)
            .map(|(hash, _)| hash.clone())
    }

    pub(super) fn put(&self, id: Uuid, hash: Option<Vec<u8>>) {
        let mut entries = self.entries.lock().expect("token cache");
        if entries.len() >= TOKEN_CACHE_MAX {
            entries.retain(|_, (_, at)| at.elapsed() < TOKEN_CACHE_TTL);
            if entries.len() >= TOKEN_CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert(id, (hash, Instant::now()));
    }
}
