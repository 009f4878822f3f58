//! One watch stream: its opening (the changes after a resume point, or a
//! snapshot), then the events of the batches the tailer hands it, bookmarks
//! while idle, a re-read of the log whenever it lagged, and a final bookmark
//! at shutdown.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::Stream;

use super::fanout::Subscription;
use super::{Batch, Inner, SnapshotJson, StreamError};
use crate::domain::Revision;
use crate::domain::events::{Audience, Bookmark, Snapshot, StreamEvent};
use crate::leader::stopped;

/// Opens a stream for `audience`: subscribes, reads the opening (a snapshot
/// comes back apart when `streamed`, see [`SnapshotJson`]), and answers the
/// events from there on.
pub(super) async fn follow(
    inner: Arc<Inner>,
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
    // Subscribed before the opening is read: nothing after it is missed.
    let subscription = Subscription::new(inner.clone(), audience);
    let mut opening = Vec::new();
    let mut snapshot = None;
    let cursor = start(
        &inner,
        audience,
        since,
        &mut opening,
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
    Ok((snapshot, events(inner, subscription, cursor, opening)))
}

/// The stream after its opening: the events of each batch handed to it, a
/// re-read of the log whenever it lagged, a bookmark when idle, and at
/// shutdown what is left in the log and a final bookmark.
fn events(
    inner: Arc<Inner>,
    mut subscription: Subscription,
    mut cursor: Revision,
    mut pending: Vec<StreamEvent>,
) -> impl Stream<Item = StreamEvent> + Send + 'static {
    let audience = subscription.audience;
    let mut shutdown = inner.shutdown.subscribe();
    async_stream::stream! {
        let metrics = inner.metrics.clone();
        metrics.open_streams.inc();
        let _open = scopeguard(move || { metrics.open_streams.dec(); });
        let mut last_sent = cursor;
        // Events taken from batches (already counted as sent).
        let mut fresh = Vec::new();
        let mut bookmarks = tokio::time::interval(inner.config.bookmark_interval);
        bookmarks.reset();
        loop {
            for e in pending.drain(..) { inner.metrics.sent(&e, None); last_sent = e.revision(); yield e; }
            if subscription.take_lagged() {
                inner.metrics.stream_resyncs.inc();
                match resync(&inner, audience, cursor, &mut pending).await {
                    Ok(c) => cursor = c,
                    Err(e) => {
                        e.log();
                        return;
                    }
                }
                continue;
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
                    let (ended, bookmark) = idle(&inner, &mut subscription, &mut cursor, last_sent, &mut fresh);
                    for e in fresh.drain(..).chain(bookmark) { last_sent = e.revision(); yield e; }
                    if ended {
                        return;
                    }
                }
                _ = stopped(&mut shutdown) => {
                    // Catch up with the log, then close at the current head.
                    if let Ok(c) = resync(&inner, audience, cursor, &mut pending).await {
                        cursor = c;
                    }
                    for e in pending.drain(..) { inner.metrics.sent(&e, None); last_sent = e.revision(); yield e; }
                    if cursor > last_sent {
                        yield StreamEvent::Bookmark(Bookmark { revision: cursor });
                    }
                    return;
                }
            }
        }
    }
}

/// A bookmark tick: everything up to where the tailer has handed out is in
/// the queue, so take it (into `fresh`); then the stream has seen all it
/// should up to there, which a bookmark says (counted as sent) unless the
/// stream already said as much or must re-read the log first. True when a
/// batch ended the stream.
fn idle(
    inner: &Inner,
    subscription: &mut Subscription,
    cursor: &mut Revision,
    last_sent: Revision,
    fresh: &mut Vec<StreamEvent>,
) -> (bool, Option<StreamEvent>) {
    let handed_out = subscription.handed_out();
    while let Ok(batch) = subscription.batches.try_recv() {
        if take(inner, subscription.audience, &batch, cursor, fresh) {
            return (true, None);
        }
    }
    if subscription.lagged.load(Ordering::Acquire) {
        return (false, None);
    }
    if let Some(h) = handed_out {
        *cursor = (*cursor).max(h);
    }
    let last = fresh.last().map_or(last_sent, StreamEvent::revision);
    if *cursor <= last {
        return (false, None);
    }
    let e = StreamEvent::Bookmark(Bookmark { revision: *cursor });
    inner.metrics.sent(&e, None);
    (false, Some(e))
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
