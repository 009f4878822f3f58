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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use sqlx::postgres::PgListener;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::clock::Clock;
use crate::domain::Revision;
use crate::domain::events::{Audience, Bookmark, Change, Snapshot, StreamEvent};
use crate::leader::{Context, stopped};
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

struct Inner {
    store: Store,
    config: HubConfig,
    metrics: Arc<Metrics>,
    subscribers: Mutex<Subscribers>,
    shutdown: watch::Sender<bool>,
}

/// The open streams, by audience, and how far the tailer has handed out.
#[derive(Default)]
struct Subscribers {
    /// Every change up to here has been handed to the streams it names;
    /// `None` until the tailer has read where the log stands.
    cursor: Option<Revision>,
    next_id: u64,
    managers: HashMap<u64, Subscriber>,
    workers: HashMap<Uuid, HashMap<u64, Subscriber>>,
}

struct Subscriber {
    batches: mpsc::Sender<Arc<Batch>>,
    lagged: Arc<AtomicBool>,
}

impl Subscriber {
    fn deliver(&self, batch: &Arc<Batch>) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.batches.try_send(batch.clone()) {
            // It has a full queue to work through; then it re-reads the log.
            self.lagged.store(true, Ordering::Release);
        }
    }

    /// Makes the stream re-read the log from its cursor.
    fn mark_lagged(&self) {
        self.lagged.store(true, Ordering::Release);
        let _ = self.batches.try_send(Arc::new(Batch {
            changes: Vec::new(),
        }));
    }
}

impl Subscribers {
    fn count(&self) -> usize {
        self.managers.len() + self.workers.values().map(HashMap::len).sum::<usize>()
    }

    fn all(&self) -> impl Iterator<Item = &Subscriber> {
        self.managers
            .values()
            .chain(self.workers.values().flat_map(HashMap::values))
    }

    /// Hands `batch` to every manager stream and to the streams of each
    /// worker it names.
    fn hand_out(&mut self, batch: Arc<Batch>) {
        for s in self.managers.values() {
            s.deliver(&batch);
        }
        let mut named: Vec<Uuid> = batch.changes.iter().filter_map(|c| c.worker_id).collect();
        named.sort_unstable();
        named.dedup();
        for w in named {
            for s in self.workers.get(&w).into_iter().flat_map(HashMap::values) {
                s.deliver(&batch);
            }
        }
        if let Some(last) = batch.changes.last() {
            self.cursor = Some(last.revision);
        }
    }

    /// The tailer goes on from `cursor` without having handed out what came
    /// before it: every stream re-reads the log.
    fn skip_to(&mut self, cursor: Revision) {
        for s in self.all() {
            s.mark_lagged();
        }
        self.cursor = Some(cursor);
    }
}

/// A stream's place among the subscribers; leaves it when dropped.
struct Subscription {
    inner: Arc<Inner>,
    audience: Audience,
    id: u64,
    batches: mpsc::Receiver<Arc<Batch>>,
    lagged: Arc<AtomicBool>,
}

impl Subscription {
    fn new(inner: Arc<Inner>, audience: Audience) -> Subscription {
        let (tx, batches) = mpsc::channel(inner.config.stream_queue.max(1));
        let lagged = Arc::new(AtomicBool::new(false));
        let subscriber = Subscriber {
            batches: tx,
            lagged: lagged.clone(),
        };
        let id = {
            let mut subs = inner.subscribers.lock().expect("subscribers lock");
            let id = subs.next_id;
            subs.next_id += 1;
            match audience {
                Audience::Manager => subs.managers.insert(id, subscriber),
                Audience::Worker(w) => subs.workers.entry(w).or_default().insert(id, subscriber),
            };
            id
        };
        Subscription {
            inner,
            audience,
            id,
            batches,
            lagged,
        }
    }

    /// Whether the stream must re-read the log (and no longer must).
    fn take_lagged(&self) -> bool {
        self.lagged.swap(false, Ordering::AcqRel)
    }

    /// How far the tailer has handed out; every batch up to it that names
    /// this stream's audience is in its queue once this returns.
    fn handed_out(&self) -> Option<Revision> {
        self.inner
            .subscribers
            .lock()
            .expect("subscribers lock")
            .cursor
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut subs = self.inner.subscribers.lock().expect("subscribers lock");
        match self.audience {
            Audience::Manager => {
                subs.managers.remove(&self.id);
            }
            Audience::Worker(w) => {
                if let Some(streams) = subs.workers.get_mut(&w) {
                    streams.remove(&self.id);
                    if streams.is_empty() {
                        subs.workers.remove(&w);
                    }
                }
            }
        }
    }
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

    /// The revision up to which the hub has handed changes to the streams;
    /// `None` before it has read where the log stands.
    pub fn handed_out(&self) -> Option<Revision> {
        self.inner
            .subscribers
            .lock()
            .expect("subscribers lock")
            .cursor
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
        StreamError,
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
        StreamError,
    > {
        let inner = self.inner.clone();
        // Subscribed before the opening is read: nothing after it is missed.
        let mut subscription = Subscription::new(inner.clone(), audience);
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
                // Events taken from batches (already counted as sent).
                let mut fresh = Vec::new();
                let mut bookmarks = tokio::time::interval(inner.config.bookmark_interval);
                bookmarks.reset();
                loop {
                    if subscription.take_lagged() {
                        inner.metrics.stream_resyncs.inc();
                        match resync(&inner, audience, cursor, &mut events).await {
                            Ok(c) => cursor = c,
                            Err(e) => {
                                e.log();
                                return;
                            }
                        }
                        for e in events.drain(..) { inner.metrics.sent(&e, None); last_sent = e.revision(); yield e; }
                    }
                    tokio::select! {
                        received = subscription.batches.recv() => {
                            let Some(batch) = received else { return };
                            let ended = take(&inner, audience, &batch, &mut cursor, &mut fresh);
                            for e in fresh.drain(..) { last_sent = e.revision(); yield e; }
                            if ended {
                                return;
                            }
                        }
                        _ = bookmarks.tick() => {
                            // Everything up to where the tailer has handed
                            // out is in the queue: take it, then the stream
                            // has seen all it should up to there.
                            let handed_out = subscription.handed_out();
                            while let Ok(batch) = subscription.batches.try_recv() {
                                let ended = take(&inner, audience, &batch, &mut cursor, &mut fresh);
                                for e in fresh.drain(..) { last_sent = e.revision(); yield e; }
                                if ended {
                                    return;
                                }
                            }
                            if subscription.lagged.load(Ordering::Acquire) {
                                continue;
                            }
                            if let Some(h) = handed_out {
                                cursor = cursor.max(h);
                            }
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
    fn log(&self) {
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

/// Appends the events `batch` holds for `audience` after `cursor` to `out`
/// (counted as sent), moving the cursor on; true when the batch ends the
/// stream (its worker was removed).
fn take(
    inner: &Inner,
    audience: Audience,
    batch: &Batch,
    cursor: &mut Revision,
    out: &mut Vec<StreamEvent>,
) -> bool {
    for change in &batch.changes {
        if change.revision <= *cursor {
            continue;
        }
        *cursor = change.revision;
        if audience.ends_with(change) {
            return true;
        }
        if let Some(e) = audience.event(change) {
            inner.metrics.sent(&e, Some(change.created_at));
            out.push(e);
        }
    }
    false
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
) -> Result<Revision, StreamError> {
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
            Err(e) => return Err(e.into()),
        }
    }
    match streamed {
        Some(slot) => {
            let worker = match audience {
                Audience::Worker(w) => Some(w),
                Audience::Manager => None,
            };
            let (revision, routes) = inner.store.snapshot_json(worker).await?;
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
) -> Result<Revision, StreamError> {
    let worker = match audience {
        Audience::Worker(w) => Some(w),
        Audience::Manager => None,
    };
    let (revision, routes) = inner.store.snapshot(worker).await?;
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
) -> Result<Revision, StreamError> {
    let worker = match audience {
        Audience::Worker(w) => Some(w),
        Audience::Manager => None,
    };
    let store = &inner.store;
    let (_, head) = store.log_horizon().await?;
    let mut next = cursor;
    let mut changes = Vec::new();
    loop {
        let page = store
            .changes_after(next, worker, inner.config.batch_size)
            .await?;
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
    let (compacted, _) = store.log_horizon().await?;
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
        return Err(StreamError::WorkerRemoved);
    }
    Ok(head.max(next))
}

/// Reads new change-log rows and hands them to the streams, until shutdown.
async fn tail(inner: Arc<Inner>) {
    let store = inner.store.clone();
    let mut commits = store.commits();
    let mut shutdown = inner.shutdown.subscribe();
    let mut cursor = loop {
        match store.log_horizon().await {
            Ok((_, head)) => {
                // Streams opened before this read may have missed what the
                // tailer starts after: they re-read the log.
                inner
                    .subscribers
                    .lock()
                    .expect("subscribers lock")
                    .skip_to(head);
                break head;
            }
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
                let skipped = first > cursor + 1;
                cursor = changes.last().map_or(cursor, |c| c.revision);
                let mut subs = inner.subscribers.lock().expect("subscribers lock");
                let span = tracing::debug_span!(
                    "fanout",
                    first,
                    last = cursor,
                    changes = changes.len(),
                    streams = subs.count(),
                );
                span.in_scope(|| {
                    if skipped {
                        // The log was compacted past the tailer's cursor.
                        subs.skip_to(cursor);
                    } else {
                        subs.hand_out(Arc::new(Batch { changes }));
                    }
                    tracing::debug!("changes handed to the streams");
                });
                drop(subs);
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
        // Wait for a commit past the cursor: this replica's own commits wake
        // the tailer twice (once here, once by their NOTIFY), and the second
        // needs no read.
        loop {
            let notified = async {
                match listener.as_mut() {
                    Some(l) => l.recv().await.map(|n| n.payload().parse::<Revision>().ok()),
                    None => std::future::pending().await,
                }
            };
            let newer = tokio::select! {
                changed = commits.changed() => match changed {
                    Ok(()) => *commits.borrow_and_update() > cursor,
                    // The store is gone: nothing more will be committed here.
                    Err(_) => return,
                },
                received = notified => match received {
                    Ok(revision) => revision.is_none_or(|r| r > cursor),
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the PostgreSQL listener; polling until it is back");
                        listener = None;
                        true
                    }
                },
                _ = tokio::time::sleep(inner.config.poll_interval) => true,
                _ = stopped(&mut shutdown) => return,
            };
            if newer || failing {
                break;
            }
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
