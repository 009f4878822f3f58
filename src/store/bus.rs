//! The Backend.AI event bus's state (`crate::backendai::bus`): the last
//! change-log revision published on Redis and, per route on a Backend.AI
//! worker, the circuit that worker was last told about. The circuit is opaque
//! JSON here: the store knows nothing of Backend.AI's shapes.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::rows::{self, route_columns};
use super::sql::{self, Arg, Tx};
use super::{Result, Store};
use crate::domain::{AppMode, Protocol, Revision, StoredRoute};

/// A circuit as published to a Backend.AI worker.
#[derive(Clone, Debug, PartialEq)]
pub struct BusCircuit {
    pub route_id: Uuid,
    pub worker_id: Uuid,
    /// The worker's name (Backend.AI's `target_worker_authority`).
    pub authority: String,
    /// The circuit as published (`SerializableCircuit`).
    pub circuit: serde_json::Value,
    /// The revision of the change its created event was published for.
    pub revision: Revision,
    /// The worker acknowledged that created event.
    pub acked: bool,
}

type BusRow = (Uuid, Uuid, String, Json<serde_json::Value>, i64, i64);

/// The bus's state as the last leader left it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BusState {
    /// Every change up to this revision has been published.
    pub position: Revision,
    pub circuits: Vec<BusCircuit>,
}

/// What one published stretch of the change log changed.
#[derive(Clone, Debug, Default)]
pub struct BusWrite {
    /// Circuits published (inserted or replaced).
    pub put: Vec<BusCircuit>,
    /// Routes no Backend.AI worker holds any more.
    pub removed: Vec<Uuid>,
    /// Removed events published, kept for the anti-entropy sweep.
    pub removals: Vec<BusRemoval>,
    /// Drop every circuit first (a republish from a snapshot).
    pub reset: bool,
    /// Created events acknowledged: (route, worker) as published.
    pub acked: Vec<(Uuid, Uuid)>,
    /// Workers' acknowledged revisions raised (never lowered) to these.
    pub acked_revisions: Vec<(Uuid, Revision)>,
}

impl BusWrite {
    /// Nothing to write but, perhaps, the position.
    pub fn is_empty(&self) -> bool {
        self.put.is_empty()
            && self.removed.is_empty()
            && self.removals.is_empty()
            && !self.reset
            && self.acked.is_empty()
            && self.acked_revisions.is_empty()
    }
}

/// A removed event as published: the circuit (a worker removes by port or
/// subdomain) on the worker's authority, at the revision of its change.
#[derive(Clone, Debug, PartialEq)]
pub struct BusRemoval {
    pub route_id: Uuid,
    pub revision: Revision,
    pub authority: String,
    pub circuit: serde_json::Value,
    pub removed_at: DateTime<Utc>,
}

type RemovalRow = (Uuid, i64, String, Json<serde_json::Value>, DateTime<Utc>);

impl Store {
    /// The bus's position and circuits.
    pub async fn bus_state(&self) -> Result<BusState> {
        let mut tx = Tx::snapshot(&self.db).await?;
        let (position,): (i64,) = tx
            .conn()
            .fetch_one(
                "SELECT bus_revision FROM coordinator_state WHERE id = 1",
                &[],
            )
            .await?;
        let rows: Vec<BusRow> = tx
            .conn()
            .fetch_all(
                "SELECT route_id, worker_id, authority, circuit, revision, acked FROM bus_circuits",
                &[],
            )
            .await?;
        tx.rollback().await?;
        let circuits = rows
            .into_iter()
            .map(
                |(route_id, worker_id, authority, Json(circuit), revision, acked)| BusCircuit {
                    route_id,
                    worker_id,
                    authority,
                    circuit,
                    revision,
                    acked: acked != 0,
                },
            )
            .collect();
        Ok(BusState { position, circuits })
    }

    /// Records what was published up to `to` and what was heard with it, if
    /// the position is still `from` (else another leader moved it: `false`,
    /// nothing written), in one transaction.
    pub async fn bus_advance(
        &self,
        from: Revision,
        to: Revision,
        write: &BusWrite,
    ) -> Result<bool> {
        let mut tx = Tx::write(&self.db).await?;
        let moved = tx
            .conn()
            .execute(
                "UPDATE coordinator_state SET bus_revision = $2 WHERE id = 1 AND bus_revision = $1",
                &[from.into(), to.into()],
            )
            .await?;
        if moved == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        if write.reset {
            tx.conn().execute("DELETE FROM bus_circuits", &[]).await?;
        }
        for id in &write.removed {
            tx.conn()
                .execute(
                    "DELETE FROM bus_circuits WHERE route_id = $1",
                    &[(*id).into()],
                )
                .await?;
        }
        for c in &write.put {
            tx.conn()
                .execute(
                    "INSERT INTO bus_circuits (route_id, worker_id, authority, circuit, revision, acked) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (route_id) DO UPDATE SET \
                     worker_id = excluded.worker_id, authority = excluded.authority, \
                     circuit = excluded.circuit, revision = excluded.revision, acked = excluded.acked",
                    &[
                        c.route_id.into(),
                        c.worker_id.into(),
                        c.authority.as_str().into(),
                        Arg::json(&c.circuit),
                        c.revision.into(),
                        i64::from(c.acked).into(),
                    ],
                )
                .await?;
        }
        for r in &write.removals {
            tx.conn()
                .execute(
                    "INSERT INTO bus_removals (route_id, revision, authority, circuit, removed_at) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (route_id, revision) DO NOTHING",
                    &[
                        r.route_id.into(),
                        r.revision.into(),
                        r.authority.as_str().into(),
                        Arg::json(&r.circuit),
                        super::db_time(r.removed_at).into(),
                    ],
                )
                .await?;
        }
        for (route, worker) in &write.acked {
            tx.conn()
                .execute(
                    "UPDATE bus_circuits SET acked = 1 WHERE route_id = $1 AND worker_id = $2",
                    &[(*route).into(), (*worker).into()],
                )
                .await?;
        }
        for (worker, revision) in &write.acked_revisions {
            tx.conn()
                .execute(
                    "UPDATE workers SET acked_revision = $2 WHERE id = $1 AND acked_revision < $2",
                    &[(*worker).into(), (*revision).into()],
                )
                .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Removed events published at or after `since`, oldest first; those
    /// before it are deleted (they are past the sweep's memory).
    pub async fn bus_removals(&self, since: DateTime<Utc>) -> Result<Vec<BusRemoval>> {
        let since = super::db_time(since);
        let mut tx = Tx::write(&self.db).await?;
        tx.conn()
            .execute(
                "DELETE FROM bus_removals WHERE removed_at < $1",
                &[since.into()],
            )
            .await?;
        let rows: Vec<RemovalRow> = tx
            .conn()
            .fetch_all(
                "SELECT route_id, revision, authority, circuit, removed_at FROM bus_removals \
                 ORDER BY removed_at, route_id",
                &[],
            )
            .await?;
        tx.commit().await?;
        Ok(rows
            .into_iter()
            .map(
                |(route_id, revision, authority, Json(circuit), removed_at)| BusRemoval {
                    route_id,
                    revision,
                    authority,
                    circuit,
                    removed_at,
                },
            )
            .collect())
    }

    /// Raises worker `id`'s acknowledged revision to `revision` (never
    /// lowers it): for workers that acknowledge on the bus, not by heartbeat.
    pub async fn advance_acked_revision(&self, id: Uuid, revision: Revision) -> Result<()> {
        let mut c = sql::acquire(&self.db).await?;
        c.conn()
            .execute(
                "UPDATE workers SET acked_revision = $2 WHERE id = $1 AND acked_revision < $2",
                &[id.into(), revision.into()],
            )
            .await?;
        Ok(())
    }

    /// Interactive http (and preopen) routes placed on a worker: those idle
    /// collection looks at.
    pub async fn interactive_http_routes(&self) -> Result<Vec<StoredRoute>> {
        let mut c = sql::acquire(&self.db).await?;
        rows::routes(
            &mut c.conn(),
            concat!(
                "SELECT ",
                route_columns!(),
                " FROM routes WHERE app_mode = $1 AND protocol IN ($2, $3) AND worker_id IS NOT NULL ORDER BY id"
            ),
            &[
                AppMode::Interactive.as_str().into(),
                Protocol::Http.as_str().into(),
                Protocol::Preopen.as_str().into(),
            ],
        )
        .await
    }

    /// Deletes route `id` if it was last changed at `revision` (so a route
    /// re-sent or moved since it was judged idle stays); `true` if deleted.
    pub async fn delete_route_at(
        &self,
        id: Uuid,
        revision: Revision,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let now = super::db_time(now);
        let mut tx = self.write().await?;
        let deleted: Option<(Option<Uuid>,)> = tx
            .conn()
            .fetch_optional(
                "DELETE FROM routes WHERE id = $1 AND revision = $2 RETURNING worker_id",
                &[id.into(), revision.into()],
            )
            .await?;
        let Some((worker_id,)) = deleted else {
            tx.rollback().await?;
            return Ok(false);
        };
        tx.log_route_deleted(id, worker_id, now);
        tx.commit().await?;
        Ok(true)
    }
}
