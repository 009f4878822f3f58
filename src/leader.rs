//! Leader election, and the one way leader-only work runs.
//!
//! Every replica serves the API and streams; only the leader runs the
//! singleton work: the liveness sweep, failover, expiry and pending
//! placement (`health`), log compaction (`hub`), the Backend.AI publisher
//! and idle collection, the Kubernetes mirror and pod watcher. Each runs
//! through [`Context::every`] (a pass at a time, periodically) or
//! [`Context::while_leading`] (a task that runs as long as leadership
//! does). Both hold the leadership guard ([`Leadership::running`]) while
//! work is under way, so at shutdown leadership is released only between
//! passes, never while one is running (a second replica could otherwise
//! start the same pass); a lost Lease stops the work at once.
//!
//! Two electors implement [`Elector`]: a PostgreSQL advisory lock (standalone)
//! and a Kubernetes Lease. With SQLite there is one process, which always leads.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::clock::Clock;
use crate::store::Store;
use crate::telemetry::Metrics;

/// A way to hold leadership among replicas.
pub trait Elector: Send + Sync + 'static {
    /// Tries to become, or to stay, the leader. `Ok(true)` while this process
    /// holds leadership; errors count as not leading.
    fn try_acquire(&mut self) -> impl Future<Output = anyhow::Result<bool>> + Send;
    /// Gives leadership up so another replica can take over at once.
    fn release(&mut self) -> impl Future<Output = ()> + Send;
    /// Resolves once the leadership confirmed by the last successful
    /// [`try_acquire`](Elector::try_acquire) can no longer be counted on (a
    /// Lease not renewed in time), whatever is still in flight; never for an
    /// elector whose leadership does not expire on its own.
    fn expiry(&self) -> Expiry {
        Box::pin(std::future::pending())
    }
}

/// See [`Elector::expiry`].
pub type Expiry = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The single process of an embedded (SQLite) deployment: always the leader.
pub struct Sole;

impl Elector for Sole {
    async fn try_acquire(&mut self) -> anyhow::Result<bool> {
        Ok(true)
    }
    async fn release(&mut self) {}
}

/// Whether this process leads right now, and a way to wait for changes.
#[derive(Clone, Debug)]
pub struct Leadership {
    rx: watch::Receiver<bool>,
    /// Keeps a fixed leadership's channel open.
    _fixed: Option<std::sync::Arc<watch::Sender<bool>>>,
    shared: std::sync::Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// How many loops run under this leadership ([`Leadership::running`]).
    running: watch::Sender<usize>,
    /// Set once leadership ends for a shutdown (not a lost Lease).
    shutting_down: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn new() -> std::sync::Arc<Shared> {
        std::sync::Arc::new(Shared {
            running: watch::channel(0).0,
            shutting_down: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

/// Counts a loop running under a [`Leadership`] until dropped.
pub struct Running(std::sync::Arc<Shared>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.send_modify(|n| *n -= 1);
    }
}

/// How long a shutdown waits for the loops to stop before releasing anyway.
pub const STOP_LIMIT: Duration = Duration::from_secs(15);

impl Leadership {
    /// Marks a loop as running until the guard is dropped: at shutdown,
    /// leadership is given up only once every such loop has stopped.
    pub fn running(&self) -> Running {
        self.shared.running.send_modify(|n| *n += 1);
        Running(self.shared.clone())
    }

    /// True once leadership ended because this process shuts down (the loops
    /// may finish what they started), not because it was lost.
    pub fn shutting_down(&self) -> bool {
        self.shared
            .shutting_down
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// Waits until this process leads.
    pub async fn acquired(&mut self) {
        let _ = self.rx.wait_for(|leading| *leading).await;
    }

    /// Waits until this process no longer leads.
    pub async fn lost(&mut self) {
        let _ = self.rx.wait_for(|leading| !*leading).await;
    }

    /// A leadership fixed at `leading` (tests, single-process tools).
    pub fn fixed(leading: bool) -> Leadership {
        let (tx, rx) = watch::channel(leading);
        Leadership {
            rx,
            _fixed: Some(std::sync::Arc::new(tx)),
            shared: Shared::new(),
        }
    }
}

/// Runs `elector` every `renew_every` until `shutdown` resolves; then stops
/// leading, waits (at most [`STOP_LIMIT`]) for the loops marked
/// [`Leadership::running`] to stop, and only then releases.
///
/// Leadership ends as soon as the elector's [`expiry`](Elector::expiry)
/// passes without a newer successful attempt, even while an attempt is still
/// stuck (in the client's retries, on a hung connection): a leader that cannot
/// renew stops leading before its Lease can be taken over.
pub fn spawn<E: Elector>(
    mut elector: E,
    renew_every: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Leadership {
    let (tx, rx) = watch::channel(false);
    let shared = Shared::new();
    let loops = shared.clone();
    tokio::spawn(async move {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(renew_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut expiry: Expiry = Box::pin(std::future::pending());
        let mut failures = 0u32;
        let set = |leading: bool| {
            let was = tx.send_replace(leading);
            if leading != was {
                tracing::info!(leading, "leadership changed");
            }
        };
        'run: loop {
            let leading = *tx.borrow();
            tokio::select! {
                _ = tick.tick() => {}
                () = &mut expiry, if leading => {
                    tracing::warn!("leadership expired without a renewal; not leading");
                    set(false);
                    continue;
                }
                () = &mut shutdown => break,
            }
            let result = {
                let attempt = elector.try_acquire();
                tokio::pin!(attempt);
                loop {
                    let leading = *tx.borrow();
                    tokio::select! {
                        result = &mut attempt => break result,
                        () = &mut expiry, if leading => {
                            tracing::warn!("leadership expired while renewing; not leading");
                            set(false);
                        }
                        () = &mut shutdown => break 'run,
                    }
                }
            };
            let leading = match result {
                Ok(l) => {
                    failures = 0;
                    l
                }
                Err(e) => {
                    // Once as a warning; the repeats of a lasting failure at debug.
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(error = %e, "leader election failed; not leading");
                    } else {
                        tracing::debug!(error = %e, failures, "leader election still failing");
                    }
                    false
                }
            };
            if leading {
                expiry = elector.expiry();
            }
            set(leading);
        }
        loops
            .shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        tx.send_replace(false);
        let mut running = loops.running.subscribe();
        if tokio::time::timeout(STOP_LIMIT, running.wait_for(|n| *n == 0))
            .await
            .is_err()
        {
            tracing::warn!("the leader's loops did not stop in time; releasing anyway");
        }
        elector.release().await;
    });
    Leadership {
        rx,
        _fixed: None,
        shared,
    }
}

/// What every subsystem takes: the store, the metrics, the clock, who leads,
/// and the shutdown signal (true once the process stops).
#[derive(Clone)]
pub struct Context {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
    pub leadership: Leadership,
    pub shutdown: watch::Receiver<bool>,
}

/// Tells a task run by [`Context::while_leading`] to stop: leadership ended
/// (lost, or given up for a shutdown).
pub type Stop = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Resolves once `shutdown` turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

impl Context {
    /// Resolves once the process shuts down.
    pub async fn stopped(&self) {
        stopped(&mut self.shutdown.clone()).await;
    }

    /// Whether leadership ends for a shutdown (work may finish what it
    /// started) rather than a lost Lease (work must stop at once).
    fn winding_down(&self) -> bool {
        *self.shutdown.borrow() || self.leadership.shutting_down()
    }

    /// Leadership ended or the process stops.
    fn stop_signal(&self) -> Stop {
        let (mut leadership, ctx) = (self.leadership.clone(), self.clone());
        Box::pin(async move {
            tokio::select! {
                () = leadership.lost() => {}
                () = ctx.stopped() => {}
            }
        })
    }

    /// Waits until this process leads; `false` when it never will again
    /// (shutdown, or the election ended).
    async fn lead(&self) -> bool {
        let mut leadership = self.leadership.clone();
        tokio::select! {
            () = leadership.acquired() => leadership.is_leader() && !*self.shutdown.borrow(),
            () = self.stopped() => false,
        }
    }

    /// Runs `pass` on `state` every `period` while this process leads, until
    /// shutdown. A pass holds the leadership guard: at shutdown it finishes
    /// (within [`STOP_LIMIT`]) before leadership is released; when the Lease
    /// is lost it is dropped at once (its transaction rolls back).
    pub async fn every<S: Send>(
        &self,
        what: &'static str,
        period: Duration,
        mut state: S,
        mut pass: impl for<'a> FnMut(&'a mut S) -> BoxFuture<'a, ()> + Send,
    ) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.stopped() => return,
            }
            if !self.leadership.is_leader() {
                if !self.lead().await {
                    return;
                }
                tick.reset();
                continue;
            }
            let _running = self.leadership.running();
            let run = pass(&mut state);
            tokio::pin!(run);
            let mut stop = self.stop_signal();
            tokio::select! {
                () = &mut run => {}
                () = &mut stop => self.finish(what, run).await,
            }
        }
    }

    /// Runs `task` on `state` whenever this process leads, with a [`Stop`]
    /// that resolves when leadership ends; restarts it (after a pause) if it
    /// ends on its own. At a shutdown the task is told to stop and given
    /// [`STOP_LIMIT`] to finish what it started, holding the leadership
    /// guard meanwhile; a lost Lease drops it at once.
    pub async fn while_leading<S: Send>(
        &self,
        what: &'static str,
        mut state: S,
        mut task: impl for<'a> FnMut(&'a mut S, Stop) -> BoxFuture<'a, anyhow::Result<()>> + Send,
    ) {
        while self.lead().await {
            let _running = self.leadership.running();
            tracing::info!(task = what, "leading: starting");
            let run = task(&mut state, self.stop_signal());
            tokio::pin!(run);
            let mut stop = self.stop_signal();
            tokio::select! {
                result = &mut run => {
                    if let Err(e) = result {
                        tracing::warn!(task = what, error = %e, "stopped; restarting");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = &mut stop => {}
                    }
                }
                () = &mut stop => {
                    self.finish(what, run).await;
                    tracing::info!(task = what, "no longer leading: stopped");
                }
            }
        }
    }

    /// Leadership ended while `run` was under way: at a shutdown, let it
    /// finish (within [`STOP_LIMIT`]); after a lost Lease, drop it.
    async fn finish<F: Future>(&self, what: &'static str, run: Pin<&mut F>) {
        if self.winding_down() && tokio::time::timeout(STOP_LIMIT, run).await.is_err() {
            tracing::warn!(task = what, "did not stop in time");
        }
    }
}

/// Standalone leader election on PostgreSQL: a session advisory lock held on
/// one dedicated connection. If the leader dies, its connection closes and
/// PostgreSQL releases the lock; another replica takes it on its next try.
pub struct AdvisoryLock {
    pool: sqlx::PgPool,
    key: i64,
    /// Detached from the pool: dropping it closes the session, and with it the lock.
    held: Option<sqlx::PgConnection>,
}

impl AdvisoryLock {
    /// The lock every coordinator sharing a database competes for.
    pub const KEY: i64 = 0x6170_7078_636f_6f72; // "appxcoor"

    pub fn new(pool: sqlx::PgPool) -> AdvisoryLock {
        AdvisoryLock {
            pool,
            key: AdvisoryLock::KEY,
            held: None,
        }
    }
}

impl Elector for AdvisoryLock {
    async fn try_acquire(&mut self) -> anyhow::Result<bool> {
        if let Some(conn) = self.held.as_mut() {
            // Still leading as long as the session holding the lock is alive.
            match sqlx::query("SELECT 1").execute(&mut *conn).await {
                Ok(_) => return Ok(true),
                Err(e) => {
                    self.held = None;
                    return Err(e.into());
                }
            }
        }
        let mut conn = self.pool.acquire().await?.detach();
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(self.key)
            .fetch_one(&mut conn)
            .await?;
        if got {
            self.held = Some(conn);
        }
        Ok(got)
    }

    async fn release(&mut self) {
        if let Some(mut conn) = self.held.take() {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(self.key)
                .execute(&mut conn)
                .await;
            let _ = sqlx::Connection::close(conn).await;
        }
    }
}
