//! The hub: tails the change log and fans route events out to watch streams.
//!
//! One tailer per process reads new change-log rows once and broadcasts them
//! in batches; every stream filters the batches for its audience (one worker,
//! or a manager), so a connected worker costs a channel receiver and a cursor,
//! not a copy of the route table. The tailer wakes on this process's commits,
//! on PostgreSQL `NOTIFY` from other replicas, and on a polling timer.
//!
//! A stream starts from a snapshot, or — given a revision still in the log —
//! from the changes after it. It then follows the batches, and whenever it
//! cannot prove it saw every revision (it lagged, or a batch skips ahead) it
//! re-reads the log from its cursor. Change-log revisions are contiguous and
//! committed in order, so a stream never skips and never repeats one.

use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use sqlx::postgres::PgListener;
use tokio::sync::{broadcast, watch};

use crate::clock::Clock;
use crate::domain::Revision;
use crate::domain::events::{Audience, Bookmark, Change, Snapshot, StreamEvent};
use crate::store::{Db, NOTIFY_CHANNEL, Store, StoreError};
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
}

impl Default for HubConfig {
    fn default() -> HubConfig {
        HubConfig {
            poll_interval: Duration::from_secs(1),
            bookmark_interval: Duration::from_secs(10),
            batch_size: 1000,
        }
    }
}

/// Consecutive change-log rows `(after, changes.last()]`.
#[derive(Debug)]
pub struct Batch {
    pub changes: Vec<Change>,
}

struct Inner {
    store: Store,
    config: HubConfig,
    metrics: Arc<Metrics>,
    batches: broadcast::Sender<Arc<Batch>>,
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
        let (batches, _) = broadcast::channel(1024);
        let hub = Hub {
            inner: Arc::new(Inner {
                store,
                config,
                metrics,
                batches,
                shutdown: watch::channel(false).0,
            }),
        };
        tokio::spawn(tail(hub.inner.clone()));
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

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Opens a stream of the events `audience` should see: the changes after
    /// `since` when that revision is still in the log, else a snapshot first.
    /// The opening (snapshot or catch-up) is read before this returns, so a
    /// change committed after it is an event on the stream; `Err` when the
    /// database cannot be read.
    pub async fn open(
        &self,
        audience: Audience,
        since: Option<Revision>,
    ) -> Result<impl Stream<Item = StreamEvent> + Send + 'static, ()> {
        let (_, events) = self.follow(audience, since, false).await?;
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
        (),
    > {
        self.follow(audience, since, true).await
    }

    async fn follow(
        &self,
        audience: Audience,
        since: Option<Revision>,
        streamed: bool,
    ) -> Result<
        (
            Option<SnapshotJson>,
            impl Stream<Item = StreamEvent> + Send + 'static,
        ),
        (),
    > {
        let inner = self.inner.clone();
        let mut batches = inner.batches.subscribe();
        let mut shutdown = inner.shutdown.subscribe();
        let mut events = Vec::new();
        let mut snapshot = None;
        let mut cursor = start(
            &inner,
            audience,
            since,
            &mut events,
            streamed.then_some(&mut snapshot),
        )
        .await?;
        if let Some(s) = &snapshot {
            inner.metrics.sent(
                &StreamEvent::Snapshot(Snapshot {
                    revision: s.revision,
                    routes: Vec::new(),
                }),
                None,
            );
        }
        Ok((
            snapshot,
            async_stream::stream! {
                let metrics = inner.metrics.clone();
                metrics.open_streams.inc();
                let _open = scopeguard(move || { metrics.open_streams.dec(); });
                let mut last_sent = cursor;
                for e in events.drain(..) {
                    inner.metrics.sent(&e, None);
                    last_sent = e.revision();
                    yield e;
                }
                let mut bookmarks = tokio::time::interval(inner.config.bookmark_interval);
                bookmarks.reset();
                loop {
                    tokio::select! {
                        received = batches.recv() => {
                            let batch = match received {
                                Ok(batch) => batch,
                                Err(broadcast::error::RecvError::Lagged(_)) => {
                                    match resync(&inner, audience, cursor, &mut events).await {
                                        Ok(c) => cursor = c,
                                        Err(()) => return,
                                    }
                                    for e in events.drain(..) { inner.metrics.sent(&e, None); last_sent = e.revision(); yield e; }
                                    continue;
                                }
                                Err(broadcast::error::RecvError::Closed) => return,
                            };
                            for change in &batch.changes {
                                if change.revision <= cursor {
                                    continue;
                                }
                                if change.revision > cursor + 1 {
                                    // Batches were missed (before we subscribed, or
                                    // the log was compacted under the tailer).
                                    match resync(&inner, audience, cursor, &mut events).await {
                                        Ok(c) => cursor = c,
                                        Err(()) => return,
                                    }
                                    for e in events.drain(..) { inner.metrics.sent(&e, None); last_sent = e.revision(); yield e; }
                                    if change.revision <= cursor {
                                        continue;
                                    }
                                }
                                cursor = change.revision;
                                if audience.ends_with(change) {
                                    return;
                                }
                                if let Some(e) = audience.event(change) {
                                    inner.metrics.sent(&e, Some(change.created_at));
                                    last_sent = e.revision();
                                    yield e;
                                }
                            }
                        }
                        _ = bookmarks.tick() => {
                            if cursor > last_sent {
                                let e = StreamEvent::Bookmark(Bookmark { revision: cursor });
                                inner.metrics.sent(&e, None);
                                last_sent = cursor;
                                yield e;
                            }
                        }
                        _ = stopped(&mut shutdown) => {
                            // Catch up with the log, then close at the current head.
                            if let Ok(c) = resync(&inner, audience, cursor, &mut events).await {
                                cursor = c;
                            }
                            for e in events.drain(..) { inner.metrics.sent(&e, None); last_sent = e.revision(); yield e; }
                            if cursor > last_sent {
                                yield StreamEvent::Bookmark(Bookmark { revision: cursor });
                            }
                            return;
                        }
                    }
                }
            },
        ))
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

/// Resolves once shutdown has been requested.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Runs `f` when dropped (the stream ends or its client goes away).
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// The opening of a stream: changes after `since`, or a snapshot. Returns the
/// cursor (every revision up to it is accounted for).
async fn start(
    inner: &Inner,
    audience: Audience,
    since: Option<Revision>,
    out: &mut Vec<StreamEvent>,
    streamed: Option<&mut Option<SnapshotJson>>,
) -> Result<Revision, ()> {
    if let Some(since) = since {
        match inner.store.log_horizon().await {
            Ok((compacted, head)) if since >= compacted && since <= head => {
                return resync(inner, audience, since, out).await;
            }
            Ok((compacted, head)) => tracing::info!(
                since,
                compacted,
                head,
                "stream resumes outside the retained log; sending a snapshot"
            ),
            Err(e) => {
                log_stream_error(&e);
                return Err(());
            }
        }
    }
    match streamed {
        Some(slot) => {
            let worker = match audience {
                Audience::Worker(w) => Some(w),
                Audience::Manager => None,
            };
            let (revision, routes) = inner
                .store
                .snapshot_json(worker)
                .await
                .map_err(|e| log_stream_error(&e))?;
            *slot = Some(SnapshotJson { revision, routes });
            Ok(revision)
        }
        None => snapshot(inner, audience, out).await,
    }
}

async fn snapshot(
    inner: &Inner,
    audience: Audience,
    out: &mut Vec<StreamEvent>,
) -> Result<Revision, ()> {
    let worker = match audience {
        Audience::Worker(w) => Some(w),
        Audience::Manager => None,
    };
    let (revision, routes) = inner
        .store
        .snapshot(worker)
        .await
        .map_err(|e| log_stream_error(&e))?;
    out.push(StreamEvent::Snapshot(Snapshot { revision, routes }));
    Ok(revision)
}

/// Reads the log after `cursor` for `audience`, falling back to a snapshot
/// when part of it has been compacted away. Returns the new cursor.
async fn resync(
    inner: &Inner,
    audience: Audience,
    cursor: Revision,
    out: &mut Vec<StreamEvent>,
) -> Result<Revision, ()> {
    let worker = match audience {
        Audience::Worker(w) => Some(w),
        Audience::Manager => None,
    };
    let store = &inner.store;
    let (_, head) = store
        .log_horizon()
        .await
        .map_err(|e| log_stream_error(&e))?;
    let mut next = cursor;
    let mut changes = Vec::new();
    loop {
        let page = store
            .changes_after(next, worker, inner.config.batch_size)
            .await
            .map_err(|e| log_stream_error(&e))?;
        let full = page.len() == inner.config.batch_size as usize;
        if let Some(last) = page.last() {
            next = last.revision;
        }
        changes.extend(page);
        if !full {
            break;
        }
    }
    // Rows read above are complete only if nothing after `cursor` was
    // compacted while we read; otherwise start over from a snapshot.
    let (compacted, _) = store
        .log_horizon()
        .await
        .map_err(|e| log_stream_error(&e))?;
    if compacted > cursor {
        return snapshot(inner, audience, out).await;
    }
    let mut ended = false;
    for change in &changes {
        if audience.ends_with(change) {
            ended = true;
            break;
        }
        out.extend(audience.event(change));
    }
    if ended {
        return Err(());
    }
    Ok(head.max(next))
}

fn log_stream_error(e: &StoreError) {
    tracing::warn!(error = %e, "watch stream ends: cannot read the change log");
}

/// Reads new change-log rows and broadcasts them, until shutdown.
async fn tail(inner: Arc<Inner>) {
    let store = inner.store.clone();
    let mut commits = store.commits();
    let mut shutdown = inner.shutdown.subscribe();
    let mut cursor = loop {
        match store.log_horizon().await {
            Ok((_, head)) => break head,
            Err(e) => {
                tracing::warn!(error = %e, "hub cannot read the change log yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(inner.config.poll_interval) => {}
                    _ = stopped(&mut shutdown) => return,
                }
            }
        }
    };
    let mut listener = None;
    let mut failing = false;
    loop {
        if listener.is_none() {
            listener = listen(&store).await;
        }
        match store
            .changes_after(cursor, None, inner.config.batch_size)
            .await
        {
            Ok(changes) if !changes.is_empty() => {
                failing = false;
                let full = changes.len() == inner.config.batch_size as usize;
                let first = changes.first().map_or(cursor, |c| c.revision);
                cursor = changes.last().map_or(cursor, |c| c.revision);
                let span = tracing::debug_span!(
                    "fanout",
                    first,
                    last = cursor,
                    changes = changes.len(),
                    streams = inner.batches.receiver_count(),
                );
                span.in_scope(|| {
                    let _ = inner.batches.send(Arc::new(Batch { changes }));
                    tracing::debug!("changes handed to the streams");
                });
                if full {
                    continue;
                }
            }
            Ok(_) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "hub cannot read the change log; streams wait");
                }
                failing = true;
            }
        }
        let notified = async {
            match listener.as_mut() {
                Some(l) => l.recv().await.map(|_| ()),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = commits.changed() => {}
            received = notified => {
                if let Err(e) = received {
                    tracing::warn!(error = %e, "lost the PostgreSQL listener; polling until it is back");
                    listener = None;
                }
            }
            _ = tokio::time::sleep(inner.config.poll_interval) => {}
            _ = stopped(&mut shutdown) => return,
        }
    }
}

/// On PostgreSQL, a listener on the commit channel (other replicas' commits).
async fn listen(store: &Store) -> Option<PgListener> {
    let Db::Postgres(pool) = store.db() else {
        return None;
    };
    let mut listener = match PgListener::connect_with(pool).await {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(error = %e, "cannot listen for other replicas' commits yet");
            return None;
        }
    };
    match listener.listen(NOTIFY_CHANNEL).await {
        Ok(()) => Some(listener),
        Err(e) => {
            tracing::debug!(error = %e, "cannot listen for other replicas' commits yet");
            None
        }
    }
}

/// Deletes change-log rows beyond retention, every `interval`, until shutdown;
/// a row's age is measured against `clock`.
pub async fn compact_periodically(
    hub: Hub,
    leadership: crate::leader::Leadership,
    interval: Duration,
    keep_revisions: u64,
    keep_for: Duration,
    clock: Clock,
) {
    let mut shutdown = hub.inner.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stopped(&mut shutdown) => return,
        }
        if !leadership.is_leader() {
            continue;
        }
        let older_than = clock.now() - chrono::Duration::from_std(keep_for).unwrap_or_default();
        match hub.store().compact_log(keep_revisions, older_than).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "compacted the change log"),
            Err(e) => tracing::warn!(error = %e, "cannot compact the change log"),
        }
    }
}
