//! The hub: tails the change log and fans route events out to watch streams.
//!
//! One tailer per process reads new change-log rows once and hands them out
//! in batches: to every manager stream, and to a worker's streams only when
//! the batch names that worker (so a create wakes the streams of the one
//! worker it landed on, not every connected worker). A stream filters what it
//! gets for its audience; a connected worker costs a channel and a cursor,
//! not a copy of the route table. The tailer wakes on this process's
//! commits, on PostgreSQL `NOTIFY` from other replicas, and on a polling
//! timer.
//!
//! A stream subscribes before it reads its opening, a snapshot or — given a
//! revision still in the log — the changes after it; from then on every batch
//! naming its audience reaches it. Whenever it cannot be sure of that (its
//! channel overflowed, or the tailer skipped ahead because the log was
//! compacted under it) the stream is marked and re-reads the log from its
//! cursor. Change-log revisions are contiguous and committed in order, so a
//! stream never skips and never repeats one.

mod fanout;
mod stream;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use tokio::sync::watch;

use crate::clock::Clock;
use crate::domain::Revision;
use crate::domain::events::{Audience, Change, StreamEvent};
use crate::leader::{Context, stopped};
use crate::store::{Store, StoreError};
use crate::telemetry::Metrics;

/// How the hub and its streams behave.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Safety-net poll of the log, for wake-ups that got lost.
    pub poll_interval: Duration,
    /// How often an idle stream is told the current revision.
    pub bookmark_interval: Duration,
    /// Rows read per query.
    pub batch_size: u32,
    /// Batches a stream may have waiting before it is marked lagged (and
    /// re-reads the log instead).
    pub stream_queue: usize,
}

impl Default for HubConfig {
    fn default() -> HubConfig {
        HubConfig {
            poll_interval: Duration::from_secs(1),
            bookmark_interval: Duration::from_secs(10),
            batch_size: 1000,
            stream_queue: 1024,
        }
    }
}

/// Consecutive change-log rows `(after, changes.last()]`.
#[derive(Debug)]
pub struct Batch {
    pub changes: Vec<Change>,
}

/// What the hub's handle, its tailer and its streams share.
struct Inner {
    store: Store,
    config: HubConfig,
    metrics: Arc<Metrics>,
    subscribers: Mutex<fanout::Subscribers>,
    /// Every batch handed out, for read models that want each change
    /// ([`Hub::batches`]); an empty batch means "re-read, some were skipped".
    batches: tokio::sync::broadcast::Sender<Arc<Batch>>,
    shutdown: watch::Sender<bool>,
}

/// Handle to the hub; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl Hub {
    /// Starts the tailer.
    pub fn start(store: Store, config: HubConfig, metrics: Arc<Metrics>) -> Hub {
        let hub = Hub {
            inner: Arc::new(Inner {
                store,
                config,
                metrics,
                subscribers: Mutex::default(),
                batches: tokio::sync::broadcast::channel(64).0,
                shutdown: watch::channel(false).0,
            }),
        };
        tokio::spawn(fanout::tail(hub.inner.clone()));
        hub
    }

    /// Ends every stream (each with a final bookmark) and the tailer.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// A receiver that turns `true` at shutdown.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.subscribe()
    }

    /// Resolves at shutdown.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.inner.shutdown.subscribe();
        async move { stopped(&mut rx).await }
    }

    /// The revision up to which the hub has handed changes to the streams;
    /// `None` before it has read where the log stands.
    pub fn handed_out(&self) -> Option<Revision> {
        self.inner
            .subscribers
            .lock()
            .expect("subscribers lock")
            .cursor
    }

    /// Every batch of changes the tailer hands out from now on, in order (the
    /// status page's read model follows them). A receiver that falls behind
    /// gets `Lagged`; an empty batch means the tailer skipped ahead past a
    /// compacted log. Either way, what came before may be incomplete.
    pub fn batches(&self) -> tokio::sync::broadcast::Receiver<Arc<Batch>> {
        self.inner.batches.subscribe()
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The context of work that runs beside this hub: its store, metrics and
    /// shutdown signal, with `clock` and `leadership`.
    pub fn context(&self, clock: Clock, leadership: crate::leader::Leadership) -> Context {
        Context {
            store: self.inner.store.clone(),
            metrics: self.inner.metrics.clone(),
            clock,
            leadership,
            shutdown: self.shutdown_signal(),
        }
    }

    /// Opens a stream of the events `audience` should see: the changes after
    /// `since` when that revision is still in the log, else a snapshot first.
    /// The opening (snapshot or catch-up) is read before this returns, so a
    /// change committed after it is an event on the stream.
    pub async fn open(
        &self,
        audience: Audience,
        since: Option<Revision>,
    ) -> Result<impl Stream<Item = StreamEvent> + Send + 'static, StreamError> {
        let (_, events) = stream::follow(self.inner.clone(), audience, since, false).await?;
        Ok(events)
    }

    /// [`Hub::open`], except that a snapshot opening is not an event of the
    /// stream but comes first, as JSON read from the database while it is
    /// sent ([`SnapshotJson`]); the events follow from its revision on.
    pub async fn open_streamed(
        &self,
        audience: Audience,
        since: Option<Revision>,
    ) -> Result<
        (
            Option<SnapshotJson>,
            impl Stream<Item = StreamEvent> + Send + 'static,
        ),
        StreamError,
    > {
        stream::follow(self.inner.clone(), audience, since, true).await
    }
}

/// Why a stream cannot open, or ends early.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The change log cannot be read.
    #[error("cannot read the change log: {0}")]
    Store(#[from] StoreError),
    /// The stream's worker was removed: nothing more is its.
    #[error("the worker was removed")]
    WorkerRemoved,
}

impl StreamError {
    pub(super) fn log(&self) {
        if let StreamError::Store(e) = self {
            tracing::warn!(error = %e, "watch stream ends: cannot read the change log");
        }
    }
}

/// A snapshot sent as JSON straight from the database: the `snapshot`
/// event's revision, and its routes' JSON separated by commas, in chunks
/// ([`Store::snapshot_json`]). An `Err` chunk means the read failed midway:
/// the event must not be finished.
pub struct SnapshotJson {
    pub revision: Revision,
    pub routes: futures::stream::BoxStream<'static, Result<Vec<u8>, StoreError>>,
}

/// Deletes change-log rows beyond retention, every `interval` while this
/// process leads (through [`Context::every`]), until shutdown; a row's age is
/// measured against `ctx.clock`.
pub async fn compact_periodically(
    ctx: Context,
    interval: Duration,
    keep_revisions: u64,
    keep_for: Duration,
) {
    ctx.every("log compaction", interval, ctx.clone(), move |ctx| {
        Box::pin(async move {
            let older_than =
                ctx.clock.now() - chrono::Duration::from_std(keep_for).unwrap_or_default();
            match ctx.store.compact_log(keep_revisions, older_than).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(rows = n, "compacted the change log"),
                Err(e) => tracing::warn!(error = %e, "cannot compact the change log"),
            }
        })
    })
    .await;
}
