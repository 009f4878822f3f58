//! The CR mirror (leader only): keeps one `AppProxyRoute` per route.
//!
//! It follows the manager's route stream from the hub, the workers (for
//! status: acknowledgement and health), and the managed CRs themselves through
//! a kube-runtime watcher, so a CR deleted or edited by hand is rewritten as
//! soon as the watch reports it. A full list-and-diff runs at start and every
//! `repair_interval` as a safety net. Writes go out in batches through a token
//! bucket, with bounded concurrency.
//!
//! Writes run beside the loop, not in it: a CR whose write hangs or fails
//! holds back no other CR. A failed write goes to a per-CR backoff queue
//! (exponential and capped, from `backon`), and is retried only once its delay
//! has passed, or sooner when what the CR should be has changed; only the first
//! failure in a row is logged as a warning.
//!
//! This file is the mirror's state and loop; `writes.rs` plans and makes
//! the writes.

mod writes;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use chrono::Utc;
use futures::StreamExt;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use uuid::Uuid;

use super::crd::{
    AppProxyRoute, AppProxyRouteSpec, AppProxyRouteStatus, FIELD_MANAGER, MANAGED_BY_LABEL,
    MANAGED_BY_VALUE, ROUTE_ID_LABEL, managed_selector, route_id_of,
};
use super::events::{Reason, Recorder};
use super::plan::{self, Action, Desired, Observed, TokenBucket};
use crate::domain::events::{Audience, StreamEvent};
use crate::domain::{Route, Worker, WorkerStatus};
use crate::hub::Hub;

/// How the mirror paces itself.
#[derive(Clone, Debug)]
pub struct MirrorConfig {
    pub namespace: String,
    /// Full list-and-diff against the API server.
    pub repair_interval: Duration,
    /// How often worker health and acknowledgements are re-read for status.
    pub status_interval: Duration,
    /// Average writes per second to the API server, and the burst allowed.
    pub writes_per_second: f64,
    pub burst: u32,
    /// Writes per batch, and how many of a batch run at once.
    pub batch_size: usize,
    pub concurrency: usize,
    /// Changes arriving within this window are written together.
    pub debounce: Duration,
    /// How long one call to the API server may take (the client's own
    /// retries included).
    pub call_timeout: Duration,
    /// The first and the longest delay before retrying a CR whose write failed.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Where repairs are told besides the CR's Events: the status page.
    pub repairs: Option<crate::status::Board>,
}

impl MirrorConfig {
    pub fn new(namespace: &str) -> MirrorConfig {
        MirrorConfig {
            namespace: namespace.to_owned(),
            repair_interval: Duration::from_secs(300),
            status_interval: Duration::from_secs(2),
            writes_per_second: 50.0,
            burst: 100,
            batch_size: 200,
            concurrency: 8,
            debounce: Duration::from_millis(100),
            call_timeout: Duration::from_secs(10),
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_secs(300),
            repairs: None,
        }
    }
}

struct Mirror {
    api: Api<AppProxyRoute>,
    hub: Hub,
    recorder: Recorder,
    config: MirrorConfig,
    limiter: Arc<Mutex<TokenBucket>>,
    /// How many writes run at once.
    permits: Arc<tokio::sync::Semaphore>,
    routes: BTreeMap<Uuid, Route>,
    routes_ready: bool,
    workers: HashMap<Uuid, Worker>,
    observed: BTreeMap<String, Observed>,
    observed_ready: bool,
    /// CRs listed since the watcher's last `Init`, swapped in at `InitDone`.
    relisting: Option<BTreeMap<String, Observed>>,
    /// The spec this process last wrote per CR: a CR that differs from it was
    /// changed by someone else (drift); one that vanished was deleted by hand.
    written: HashMap<String, AppProxyRouteSpec>,
    /// The uid of each CR as this process last wrote it.
    uids: HashMap<String, String>,
    /// Events to record once their CR exists.
    events: HashMap<String, Vec<(Reason, String)>>,
    /// Where routes deleted from the stream were, until their CRs are gone
    /// (a delete followed by an upsert of the same route is a move).
    departed: HashMap<Uuid, Option<Uuid>>,
    /// CRs with a write under way: not planned again until it is done.
    in_flight: HashSet<String>,
    /// CRs whose last write failed, and when to retry.
    failing: HashMap<String, Failing>,
}

/// A CR whose writes keep failing.
struct Failing {
    /// The write that failed; a different one is tried at once.
    action: Action,
    desired: Option<Desired>,
    retry_at: tokio::time::Instant,
    delays: backon::ExponentialBackoff,
}

type Write =
    futures::future::BoxFuture<'static, (writes::Job, anyhow::Result<Option<AppProxyRoute>>)>;

/// Runs the mirror until `stop` resolves (then finishing the writes under
/// way), the route stream ends or the API fails for good.
pub async fn run(
    client: kube::Client,
    hub: Hub,
    recorder: Recorder,
    config: MirrorConfig,
    stop: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    tokio::pin!(stop);
    let api: Api<AppProxyRoute> = Api::namespaced(client, &config.namespace);
    let mut m = Mirror::new(api.clone(), hub.clone(), recorder, config.clone());
    let mut writes: futures::stream::FuturesUnordered<Write> =
        futures::stream::FuturesUnordered::new();
    m.refresh_workers().await?;
    let mut routes = hub.open(Audience::Manager, None).await?.boxed();
    let mut crs = watcher(api, watcher::Config::default().labels(&managed_selector()))
        .default_backoff()
        .boxed();
    let mut repair = tokio::time::interval(config.repair_interval);
    repair.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    repair.tick().await; // the watcher's initial list is the first full diff
    let mut status = tokio::time::interval(config.status_interval);
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dirty = true;
    tracing::info!(namespace = %config.namespace, "AppProxyRoute mirror started");
    loop {
        let ready = m.routes_ready && m.observed_ready;
        let settle = async {
            if dirty && ready {
                tokio::time::sleep(config.debounce).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let retry = m
            .failing
            .values()
            .map(|f| f.retry_at)
            .min()
            .map(tokio::time::sleep_until);
        let retry = async {
            match retry {
                Some(r) => r.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut stop => {
                // Leadership ends: start nothing more, and see the writes
                // under way through, so none lands after the Lease is released.
                while let Ok(Some((job, result))) =
                    tokio::time::timeout(config.call_timeout, writes.next()).await
                {
                    m.done(job, result);
                }
                tracing::info!("AppProxyRoute mirror stopped");
                return Ok(());
            }
            Some((job, result)) = writes.next(), if !writes.is_empty() => {
                m.done(job, result);
                m.flush_events().await;
                dirty = true;
            }
            () = retry, if !dirty => dirty = true,
            event = routes.next() => match event {
                Some(e) => { m.on_route_event(e).await; dirty = true; }
                None => anyhow::bail!("the route stream ended"),
            },
            event = crs.next() => match event {
                Some(Ok(e)) => dirty |= m.on_cr_event(e),
                Some(Err(e)) => tracing::warn!(error = %e, "AppProxyRoute watch failed; retrying"),
                None => anyhow::bail!("the AppProxyRoute watch ended"),
            },
            _ = repair.tick() => {
                match m.relist().await {
                    Ok(()) => dirty = true,
                    Err(e) => tracing::warn!(error = %e, "cannot list AppProxyRoutes for repair"),
                }
            }
            _ = status.tick() => {
                match m.refresh_workers().await {
                    Ok(changed) => dirty |= changed,
                    Err(e) => tracing::warn!(error = %e, "cannot read workers"),
                }
            }
            () = settle => dirty = m.reconcile(&mut writes),
        }
    }
}

fn observed_of(cr: &AppProxyRoute) -> Observed {
    Observed {
        spec: Some(cr.spec.clone()),
        status: cr.status.clone(),
        generation: cr.metadata.generation,
        uid: cr.metadata.uid.clone(),
        resource_version: cr.metadata.resource_version.clone(),
    }
}

/// True when `candidate` is older than `current` (etcd resource versions are
/// increasing integers; anything else is taken as new).
fn is_older(candidate: Option<&str>, current: Option<&str>) -> bool {
    match (
        candidate.and_then(|v| v.parse::<u64>().ok()),
        current.and_then(|v| v.parse::<u64>().ok()),
    ) {
        (Some(a), Some(b)) => a < b,
        _ => false,
    }
}

impl Mirror {
    fn new(api: Api<AppProxyRoute>, hub: Hub, recorder: Recorder, config: MirrorConfig) -> Mirror {
        let limiter = Arc::new(Mutex::new(TokenBucket::new(
            config.writes_per_second,
            config.burst,
            Instant::now(),
        )));
        Mirror {
            api,
            hub,
            recorder,
            permits: Arc::new(tokio::sync::Semaphore::new(config.concurrency.max(1))),
            config,
            limiter,
            routes: BTreeMap::new(),
            routes_ready: false,
            workers: HashMap::new(),
            observed: BTreeMap::new(),
            observed_ready: false,
            relisting: None,
            written: HashMap::new(),
            uids: HashMap::new(),
            events: HashMap::new(),
            in_flight: HashSet::new(),
            failing: HashMap::new(),
            departed: HashMap::new(),
        }
    }

    async fn on_route_event(&mut self, event: StreamEvent) {
        match event {
            StreamEvent::Snapshot(s) => {
                self.routes = s.routes.into_iter().map(|r| (r.id, r)).collect();
                self.routes_ready = true;
            }
            StreamEvent::Upsert(u) => {
                let route = *u.route;
                if route
                    .worker_id
                    .is_some_and(|w| !self.workers.contains_key(&w))
                {
                    let _ = self.refresh_workers().await;
                }
                // A route seen for the first time gets its placement event when
                // its CR is created; here only changes of known routes count.
                let known = self
                    .routes
                    .get(&route.id)
                    .map(|r| r.worker_id)
                    .or_else(|| self.departed.remove(&route.id));
                let name_of = |w: Uuid| {
                    self.workers
                        .get(&w)
                        .map_or_else(|| w.to_string(), |w| w.name.clone())
                };
                let note = match (known, route.worker_id) {
                    (Some(None), Some(w)) => Some((
                        Reason::Placed,
                        format!(
                            "placed on worker {} at {}",
                            name_of(w),
                            route.frontend.url.as_deref().unwrap_or("-")
                        ),
                    )),
                    (Some(Some(a)), Some(b)) if a != b => Some((
                        Reason::FailedOver,
                        format!(
                            "moved from worker {} to {} at {}",
                            name_of(a),
                            name_of(b),
                            route.frontend.url.as_deref().unwrap_or("-")
                        ),
                    )),
                    _ => None,
                };
                if let Some(n) = note {
                    self.events
                        .entry(super::crd::cr_name(route.id))
                        .or_default()
                        .push(n);
                }
                self.routes.insert(route.id, route);
            }
            StreamEvent::Delete(d) => {
                // A move reaches the manager's stream as a delete (from the old
                // worker) then an upsert (on the new one): remember where the
                // route was, and keep its pending events, until its CR is gone.
                if let Some(route) = self.routes.remove(&d.route_id) {
                    self.departed.insert(route.id, route.worker_id);
                }
            }
            StreamEvent::Bookmark(_) => {}
        }
    }

    /// Returns true when the observed CRs changed.
    fn on_cr_event(&mut self, event: watcher::Event<AppProxyRoute>) -> bool {
        match event {
            watcher::Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(cr) => {
                if let (Some(list), Some(name)) =
                    (self.relisting.as_mut(), cr.metadata.name.clone())
                {
                    list.insert(name, observed_of(&cr));
                }
                false
            }
            watcher::Event::InitDone => {
                if let Some(list) = self.relisting.take() {
                    self.observed = list;
                }
                self.observed_ready = true;
                true
            }
            watcher::Event::Apply(cr) => {
                let Some(name) = cr.metadata.name.clone() else {
                    return false;
                };
                let current = self
                    .observed
                    .get(&name)
                    .and_then(|o| o.resource_version.as_deref());
                if is_older(cr.metadata.resource_version.as_deref(), current) {
                    return false;
                }
                let o = observed_of(&cr);
                let changed = self.observed.get(&name) != Some(&o);
                self.observed.insert(name, o);
                changed
            }
            watcher::Event::Delete(cr) => {
                let Some(name) = cr.metadata.name.as_deref() else {
                    return false;
                };
                self.observed.remove(name).is_some()
            }
        }
    }

    /// A full list of the managed CRs replaces what the watch reported.
    async fn relist(&mut self) -> anyhow::Result<()> {
        let list = tokio::time::timeout(
            self.config.call_timeout,
            self.api
                .list(&ListParams::default().labels(&managed_selector())),
        )
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {:?}", self.config.call_timeout))??;
        self.observed = list
            .items
            .iter()
            .filter_map(|cr| Some((cr.metadata.name.clone()?, observed_of(cr))))
            .collect();
        self.observed_ready = true;
        Ok(())
    }

    /// Re-reads the workers; true when anything a status shows changed.
    async fn refresh_workers(&mut self) -> anyhow::Result<bool> {
        let workers: HashMap<Uuid, Worker> = self
            .hub
            .store()
            .list_workers()
            .await?
            .into_iter()
            .map(|w| (w.id, w))
            .collect();
        let key = |w: &Worker| (w.name.clone(), w.status, w.acked_revision);
        let changed = workers.len() != self.workers.len()
            || workers
                .iter()
                .any(|(id, w)| self.workers.get(id).map(key) != Some(key(w)));
        for (id, w) in &workers {
            let was_lost = self.workers.get(id).map(|o| o.status) == Some(WorkerStatus::Lost);
            if w.status == WorkerStatus::Lost && !was_lost && !self.workers.is_empty() {
                for r in self.routes.values().filter(|r| r.worker_id == Some(*id)) {
                    self.events
                        .entry(super::crd::cr_name(r.id))
                        .or_default()
                        .push((
                            Reason::FailingOver,
                            format!("worker {} is lost; the route is about to move", w.name),
                        ));
                }
            }
        }
        self.workers = workers;
        Ok(changed)
    }
}
