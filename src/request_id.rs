//! The id of the HTTP request a task is serving, carried with the task: the
//! API sets it around each request ([`scope`]); work done for the request
//! on the same task (the store's create writer reads it when it queues a
//! create) finds it with [`current`]. A leaf: it knows nothing of HTTP or
//! the store.

use std::future::Future;
use std::sync::Arc;

tokio::task_local! {
    static REQUEST_ID: Arc<str>;
}

/// Runs `f` as the work of the request `id`: [`current`] answers it there.
pub async fn scope<F: Future>(id: Arc<str>, f: F) -> F::Output {
    REQUEST_ID.scope(id, f).await
}

/// The id of the HTTP request the calling task is serving, if any.
pub fn current() -> Option<Arc<str>> {
    REQUEST_ID.try_with(Arc::clone).ok()
}
