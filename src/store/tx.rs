//! The write transaction every mutation goes through.
//!
//! [`Store::write`] locks the single `coordinator_state` row, so writes are
//! serialised and the revisions they append are committed in order: a reader
//! that has seen revision N has seen everything before N. A write takes
//! revisions with [`WriteTx::next_revision`] and appends one change-log row
//! per change with [`WriteTx::log`], in the same transaction as the change
//! itself; [`WriteTx::commit`] writes the rows, records the last revision
//! (on PostgreSQL with a NOTIFY that other replicas receive at commit),
//! commits and wakes this process's hub.

use chrono::{DateTime, Utc};
use tokio::sync::MutexGuard;
use uuid::Uuid;

use super::sql::{self, Arg, Conn, Tx};
use super::{Db, NOTIFY_CHANNEL, Result, Store};
use crate::domain::Revision;
use crate::domain::events::ChangeKind;

/// Values per change-log row.
const LOG_COLUMNS: usize = 7;
/// Change-log rows per `INSERT` (7 values each, well under both backends'
/// limits on statement parameters).
const LOG_ROWS_PER_INSERT: usize = 1000;

/// An open write transaction holding the revision lock.
pub struct WriteTx<'s> {
    store: &'s Store,
    tx: Tx,
    /// SQLite has one writer at a time; writers queue on this gate, in order,
    /// instead of spinning on SQLITE_BUSY. (PostgreSQL queues on the row lock.)
    _gate: Option<MutexGuard<'s, ()>>,
    head: Revision,
    last: Revision,
    log: Vec<Arg>,
    /// The trace context of the work this transaction does, logged with
    /// each change ([`crate::trace_context::current`] where it began).
    trace: Option<String>,
}

impl Store {
    /// Begins a write: waits for the revision lock.
    #[tracing::instrument(level = "debug", name = "write_begin", skip_all, fields(head = tracing::field::Empty))]
    pub(crate) async fn write(&self) -> Result<WriteTx<'_>> {
        let gate = match self.db {
            Db::Sqlite(_) => Some(self.sqlite_writer.lock().await),
            Db::Postgres(_) => None,
        };
        let mut tx = Tx::write(&self.db).await?;
        let (head,): (i64,) = tx
            .conn()
            .fetch_one(
                "UPDATE coordinator_state SET revision = revision WHERE id = 1 RETURNING revision",
                &[],
            )
            .await?;
        tracing::Span::current().record("head", head);
        Ok(WriteTx {
            store: self,
            tx,
            _gate: gate,
            head,
            last: head,
            log: Vec::new(),
            trace: crate::trace_context::current(),
        })
    }
}

impl WriteTx<'_> {
    /// For statements inside the transaction.
    pub fn conn(&mut self) -> Conn<'_> {
        self.tx.conn()
    }

    /// The last revision committed before this transaction.
    pub fn head(&self) -> Revision {
        self.head
    }

    /// Takes the next revision for a change.
    pub fn next_revision(&mut self) -> Revision {
        self.last += 1;
        self.last
    }

    /// Appends a change-log row at `revision` (one taken with
    /// [`WriteTx::next_revision`]); `payload` is the route or worker as it now
    /// is, or [`Arg::NULL_JSON`] for a delete.
    pub fn log(
        &mut self,
        revision: Revision,
        kind: ChangeKind,
        route: Option<Uuid>,
        worker: Option<Uuid>,
        payload: Arg,
        at: DateTime<Utc>,
    ) {
        let trace = self.trace.clone();
        self.log_traced(revision, kind, route, worker, payload, at, trace);
    }

    /// [`WriteTx::log`] for work done for someone else (the create writer
    /// commits many requests' creates): the change carries `trace`.
    #[allow(clippy::too_many_arguments)]
    pub fn log_traced(
        &mut self,
        revision: Revision,
        kind: ChangeKind,
        route: Option<Uuid>,
        worker: Option<Uuid>,
        payload: Arg,
        at: DateTime<Utc>,
        trace: Option<String>,
    ) {
        self.log.extend([
            revision.into(),
            kind.as_str().into(),
            route.into(),
            worker.into(),
            payload,
            at.into(),
            Arg::Text(trace),
        ]);
    }

    /// Takes the next revision for the deletion of route `route` from
    /// `worker` (a `delete` on that worker's stream), logs it and answers it.
    pub fn log_route_deleted(
        &mut self,
        route: Uuid,
        worker: Option<Uuid>,
        at: DateTime<Utc>,
    ) -> Revision {
        let revision = self.next_revision();
        self.log(
            revision,
            ChangeKind::RouteDelete,
            Some(route),
            worker,
            Arg::NULL_JSON,
            at,
        );
        revision
    }

    /// Commits. Answers the last revision taken (the head if none was).
    /// Its span names the revisions committed, `first..=last` (none when
    /// `changes` is 0).
    #[tracing::instrument(
        level = "debug",
        name = "write_commit",
        skip_all,
        fields(first = self.head + 1, last = self.last, changes = self.last - self.head)
    )]
    pub async fn commit(mut self) -> Result<Revision> {
        let mut rows = std::mem::take(&mut self.log);
        while !rows.is_empty() {
            let rest = rows.split_off(rows.len().min(LOG_ROWS_PER_INSERT * LOG_COLUMNS));
            let insert = format!(
                "INSERT INTO change_log (revision, kind, route_id, worker_id, payload, created_at, trace) VALUES {}",
                sql::values(rows.len() / LOG_COLUMNS, LOG_COLUMNS, 1)
            );
            self.tx
                .conn()
                .execute(sqlx::AssertSqlSafe(insert), &rows)
                .await?;
            rows = rest;
        }
        if self.last > self.head {
            let (save, args): (&str, &[Arg]) = match self.store.db {
                Db::Postgres(_) => (
                    "WITH saved AS (UPDATE coordinator_state SET revision = $1::bigint WHERE id = 1) \
                     SELECT pg_notify($2, $1::bigint::text)",
                    &[self.last.into(), NOTIFY_CHANNEL.into()],
                ),
                Db::Sqlite(_) => (
                    "UPDATE coordinator_state SET revision = $1 WHERE id = 1",
                    &[self.last.into()],
                ),
            };
            self.tx.conn().execute(save, args).await?;
        }
        self.tx.commit().await?;
        self.store.published(self.last);
        Ok(self.last)
    }

    /// Commits a transaction whose change-log rows up to `last` (taken with
    /// [`WriteTx::next_revision`]) and whose saved revision (with its
    /// NOTIFY) the caller wrote itself, in its own statement; nothing may
    /// have been given to [`WriteTx::log`]. Answers `last`.
    pub async fn commit_written(mut self, last: Revision) -> Result<Revision> {
        debug_assert!(self.log.is_empty() && last == self.last);
        self.log.clear();
        self.tx.commit().await?;
        self.store.published(last);
        Ok(last)
    }

    /// Ends the transaction without changing anything.
    pub async fn rollback(self) -> Result<()> {
        self.tx.rollback().await?;
        Ok(())
    }
}
