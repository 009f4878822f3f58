//! What a writer that places routes knows of the workers between its
//! transactions: the create writer keeps one for its batches, failover one
//! for the batches of a worker's routes, so neither reads every worker per
//! batch.

use std::collections::{HashMap, HashSet};

use sqlx::types::Json;
use uuid::Uuid;

use super::Result;
use super::rows::{self, worker_select};
use super::sql;
use super::tx::WriteTx;
use crate::domain::Revision;
use crate::domain::placer::Placer;

/// What a writer knows of the workers between its transactions: their
/// placement facts (status, registration, route count) and the frontends
/// taken on those it placed on, as of `revision`. Every change to any of
/// these takes a revision whose change-log row names the worker, so when the
/// head has moved on (another write, or another replica) the writer reads
/// again only the workers the log names after `revision`; a batch that did
/// not commit marks the workers it touched `stale` instead. Nothing here reads
/// every worker per batch: that happens once, when the cache starts (or the
/// log no longer reaches back to it).
#[derive(Debug, Default)]
pub(super) struct WorkerCache {
    revision: Revision,
    placer: Option<Placer>,
    stale: HashSet<Uuid>,
    /// The last locked batch found another write after the writer's own
    /// (another replica, or the health loop): the next batch goes the locked
    /// way instead of trying without the lock first.
    contended: bool,
}

/// More changed workers than this since the cache's revision: read them all.
const REFRESH_MAX: usize = 1000;

impl WorkerCache {
    /// The placer, lent without a transaction, when it is known current as of
    /// the last revision the writer committed (`revision`): the batch must
    /// then write only if the head is still that revision.
    pub(super) fn lease_current(&mut self) -> Option<(Revision, Lease<'_>)> {
        if !self.stale.is_empty() || self.contended {
            return None;
        }
        let placer = self.placer.take()?;
        let revision = self.revision;
        Some((
            revision,
            Lease {
                cache: self,
                placer,
                touched: Vec::new(),
            },
        ))
    }

    /// A batch taken as written at its lease's end (an unlocked write, see
    /// the create writer) was not, after all: it was placed on `head`, on
    /// `touched`. The workers it placed on are read again, the log from no
    /// later than `head`, and the next batch goes the locked way. (Reading
    /// the log from an earlier revision than needed only reads again what the
    /// placer already knows.)
    pub(super) fn not_written(&mut self, head: Revision, touched: Vec<Uuid>) {
        self.revision = self.revision.min(head);
        self.stale.extend(touched);
        self.contended = true;
    }

    /// The placer as of the transaction's head, lent for one batch.
    pub(super) async fn lease<'c>(&'c mut self, tx: &mut WriteTx<'_>) -> Result<Lease<'c>> {
        let head = tx.head();
        self.contended = self.placer.is_some() && self.revision != head;
        let placer = match self.placer.take() {
            Some(placer) if self.revision == head && self.stale.is_empty() => Some(placer),
            Some(mut placer) if self.revision <= head => {
                match changes_since(&mut tx.conn(), self.revision).await? {
                    Some(changes) if changes.len() + self.stale.len() <= REFRESH_MAX => {
                        let mut ids: Vec<Uuid> = self.stale.iter().copied().collect();
                        for &id in &ids {
                            // Our own placements there were not written.
                            placer.forget_used(id);
                        }
                        for (kind, worker, landed) in changes {
                            let Some(worker) = worker else { continue };
                            match (kind.as_str(), landed) {
                                // A route landed there: its frontend is taken.
                                ("route_upsert", Some(Json(l))) => {
                                    placer.note_taken(
                                        worker,
                                        l.frontend.port,
                                        l.frontend.subdomain,
                                    );
                                }
                                // A route left, or the worker changed: read again.
                                _ => placer.forget_used(worker),
                            }
                            ids.push(worker);
                        }
                        ids.sort_unstable();
                        ids.dedup();
                        let fresh = rows::workers_by_id(&mut tx.conn(), &ids).await?;
                        placer.refresh(&ids, fresh);
                        Some(placer)
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        let placer = match placer {
            Some(placer) => placer,
            None => {
                let workers = rows::workers(&mut tx.conn(), worker_select!(), &[]).await?;
                Placer::new(workers, HashMap::new())
            }
        };
        // Fresh as of `head` now.
        self.revision = head;
        self.stale.clear();
        Ok(Lease {
            cache: self,
            placer,
            touched: Vec::new(),
        })
    }
}

/// A writer's placer, lent to one transaction. Whatever way the batch
/// ends, the placer goes back to the cache; unless the batch committed, the
/// workers it placed on are marked stale (their counts and frontends in the
/// placer include routes that were not written).
pub(super) struct Lease<'c> {
    cache: &'c mut WorkerCache,
    pub(super) placer: Placer,
    /// Workers placed on in this transaction.
    pub(super) touched: Vec<Uuid>,
}

impl Lease<'_> {
    /// The batch committed (or wrote nothing) at `revision`.
    pub(super) fn committed(mut self, revision: Revision) {
        self.cache.revision = revision;
        self.touched.clear();
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.cache.stale.extend(self.touched.drain(..));
        self.cache.placer = Some(std::mem::take(&mut self.placer));
    }
}

/// Where a route landed, as its change-log row says.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct Landed {
    frontend: LandedFrontend,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct LandedFrontend {
    port: Option<u16>,
    subdomain: Option<String>,
}

/// A change-log row after the cache's revision: its kind, the worker it
/// names, and for a route upsert where the route landed.
type LoggedChange = (String, Option<Uuid>, Option<Json<Landed>>);

/// The change-log rows after `since` that name a worker; `None` when the
/// log has been compacted past `since` (and so cannot say).
async fn changes_since(
    conn: &mut sql::Conn<'_>,
    since: Revision,
) -> Result<Option<Vec<LoggedChange>>> {
    let rows: Vec<LoggedChange> = conn
        .fetch_all(
            "SELECT kind, worker_id, CASE WHEN kind = 'route_upsert' THEN payload END AS payload \
             FROM change_log WHERE revision > $1 AND worker_id IS NOT NULL \
             UNION ALL SELECT 'compacted', NULL, NULL FROM coordinator_state \
             WHERE id = 1 AND compacted_revision > $1",
            &[since.into()],
        )
        .await?;
    if rows.iter().any(|(kind, _, _)| kind == "compacted") {
        return Ok(None);
    }
    Ok(Some(rows))
}
