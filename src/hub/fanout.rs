//! The hand-out: one tailer per process reads new change-log rows once and
//! hands each batch to every manager stream and to the streams of the
//! workers it names ([`Subscribers::hand_out`]); a stream that cannot be
//! sure it got everything (its queue overflowed, the log was compacted
//! under the tailer) is marked lagged and re-reads the log.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::postgres::PgListener;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{Batch, Inner};
use crate::domain::Revision;
use crate::domain::events::Audience;
use crate::leader::stopped;
use crate::store::{Db, NOTIFY_CHANNEL, Store, StoreError};

/// The open streams, by audience, and how far the tailer has handed out.
#[derive(Default)]
pub(super) struct Subscribers {
    /// Every change up to here has been handed to the streams it names;
    /// `None` until the tailer has read where the log stands.
    pub(super) cursor: Option<Revision>,
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
pub(super) struct Subscription {
    inner: Arc<Inner>,
    pub(super) audience: Audience,
    id: u64,
    pub(super) batches: mpsc::Receiver<Arc<Batch>>,
    pub(super) lagged: Arc<AtomicBool>,
}

impl Subscription {
    pub(super) fn new(inner: Arc<Inner>, audience: Audience) -> Subscription {
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
    pub(super) fn take_lagged(&self) -> bool {
        self.lagged.swap(false, Ordering::AcqRel)
    }

    /// How far the tailer has handed out; every batch up to it that names
    /// this stream's audience is in its queue once this returns.
    pub(super) fn handed_out(&self) -> Option<Revision> {
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

/// Reads new change-log rows and hands them to the streams, until shutdown.
pub(super) async fn tail(inner: Arc<Inner>) {
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
        match hand_out_after(&inner, &mut cursor).await {
            Ok(true) => {
                failing = false;
                continue; // a full batch: there may be more
            }
            Ok(false) => failing = false,
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

/// Reads a batch of the rows after `cursor` and hands it to the streams it
/// names (or, when the log was compacted past the cursor, makes every
/// stream re-read it), moving the cursor on. True when the batch was full.
async fn hand_out_after(inner: &Inner, cursor: &mut Revision) -> Result<bool, StoreError> {
    let changes = inner
        .store
        .changes_after(*cursor, None, inner.config.batch_size)
        .await?;
    if changes.is_empty() {
        return Ok(false);
    }
    let full = changes.len() == inner.config.batch_size as usize;
    let first = changes.first().map_or(*cursor, |c| c.revision);
    let skipped = first > *cursor + 1;
    *cursor = changes.last().map_or(*cursor, |c| c.revision);
    let mut subs = inner.subscribers.lock().expect("subscribers lock");
    let span = tracing::debug_span!(
        "fanout",
        first,
        last = *cursor,
        changes = changes.len(),
        streams = subs.count(),
    );
    span.in_scope(|| {
        let batch = if skipped {
            // The log was compacted past the tailer's cursor.
            subs.skip_to(*cursor);
            Arc::new(Batch {
                changes: Vec::new(),
            })
        } else {
            let batch = Arc::new(Batch { changes });
            subs.hand_out(batch.clone());
            batch
        };
        // No receiver (no status page) is no error.
        let _ = inner.batches.send(batch);
        tracing::debug!("changes handed to the streams");
    });
    Ok(full)
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
