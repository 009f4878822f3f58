//! The status page's read model (`/ui`, served by `api::ui`): workers, routes
//! and stranded circuits as the store has them, and what happened recently —
//! failovers, moves, routes left waiting, workers changing status, drift
//! repairs — followed from the change log through the hub.
//!
//! One [`Board`] per process follows every batch the hub hands out; each open
//! page holds a [`Board::changed`] receiver and reads [`Board::state_json`],
//! which is built once per change and shared by every page (a change costs
//! one read of the store however many pages are open). What the change log
//! does not carry (acknowledgements, heartbeats) is refreshed every
//! `refresh`, and only while a page is open.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{broadcast, watch};
use uuid::Uuid;

use crate::domain::events::{Change, ChangeKind};
use crate::domain::{Revision, WorkerStatus};
use crate::hub::Hub;
use crate::store::{RouteFilter, Store, StoreError};

/// Recent events kept per process.
pub const RECENT: usize = 100;
/// Routes listed on the page at most (the counts cover all of them).
pub const ROUTES_SHOWN: usize = 2000;

/// Something that happened, as the page lists it.
#[derive(Clone, Debug, Serialize)]
pub struct Activity {
    pub at: DateTime<Utc>,
    /// `failover`, `moved`, `pending`, `worker`, `drift-repaired`, `restored`.
    pub kind: &'static str,
    pub route_id: Option<Uuid>,
    pub text: String,
}

/// The page's content.
#[derive(Serialize)]
struct State<'a> {
    /// Every change up to here is reflected.
    revision: Option<Revision>,
    generated_at: DateTime<Utc>,
    workers: Vec<WorkerRow>,
    routes: Vec<RouteRow>,
    /// True when more routes exist than the [`ROUTES_SHOWN`] listed.
    routes_truncated: bool,
    stranded: Vec<StrandedRow>,
    recent: &'a [Activity],
}

#[derive(Serialize)]
struct WorkerRow {
    id: Uuid,
    name: String,
    status: WorkerStatus,
    routes: u64,
    capacity: Option<u32>,
    last_heartbeat: DateTime<Utc>,
    revision_lag: Revision,
    api_url: String,
    backendai: bool,
}

#[derive(Serialize)]
struct RouteRow {
    id: Uuid,
    worker_id: Option<Uuid>,
    service: String,
    app_mode: crate::domain::AppMode,
    protocol: crate::domain::Protocol,
    url: Option<String>,
    status: crate::domain::RouteStatus,
    pending_reason: Option<String>,
    circuit: bool,
    session_id: Option<Uuid>,
    endpoint_id: Option<Uuid>,
}

#[derive(Serialize)]
struct StrandedRow {
    route_id: Uuid,
    worker: String,
    url: Option<String>,
    reason: String,
}

/// Handle to the read model; cheap to clone.
#[derive(Clone)]
pub struct Board {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Board {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Board")
    }
}

struct Inner {
    store: Store,
    hub: Hub,
    recent: Mutex<Recent>,
    version: watch::Sender<u64>,
    /// The last state built, with the version it was built at.
    cache: tokio::sync::Mutex<Option<(u64, Arc<String>)>>,
}

/// Recent events, and what telling them needs.
#[derive(Default)]
struct Recent {
    events: VecDeque<Activity>,
    /// Worker names and statuses as last read (names kept after removal).
    workers: HashMap<Uuid, (String, WorkerStatus)>,
    /// A route deleted from a worker at the last revision seen: the upsert
    /// at the next revision, if any, is its move.
    deleted: Option<(Revision, Uuid, Option<Uuid>)>,
    /// The workers have been read once: what was there before is no news.
    seeded: bool,
}

impl Recent {
    fn push(&mut self, activity: Activity) {
        if self.events.len() == RECENT {
            self.events.pop_back();
        }
        self.events.push_front(activity);
    }

    fn name(&self, worker: Option<Uuid>) -> String {
        match worker {
            None => "no worker".to_owned(),
            Some(id) => self
                .workers
                .get(&id)
                .map_or_else(|| id.to_string(), |(name, _)| name.clone()),
        }
    }

    /// Takes in the workers as read now, telling each status change (and,
    /// after the first read, each new worker).
    fn workers_now(&mut self, workers: &[crate::domain::Worker], at: DateTime<Utc>) {
        let news = std::mem::replace(&mut self.seeded, true);
        for w in workers {
            let before = self.workers.insert(w.id, (w.name.clone(), w.status));
            if !news {
                continue;
            }
            match before {
                Some((_, was)) if was != w.status => self.push(Activity {
                    at,
                    kind: "worker",
                    route_id: None,
                    text: format!("worker {} is {:?} (was {:?})", w.name, w.status, was),
                }),
                None => self.push(Activity {
                    at,
                    kind: "worker",
                    route_id: None,
                    text: format!("worker {} registered ({:?})", w.name, w.status),
                }),
                Some(_) => {}
            }
        }
    }

    /// Tells the moves among `changes`: a route deleted from worker A at
    /// revision n and upserted at n + 1 moved from A (to another worker, or
    /// to none: it waits).
    fn changes(&mut self, changes: &[Change]) {
        for c in changes {
            match (c.kind, c.route_id) {
                (ChangeKind::RouteDelete, Some(route)) => {
                    self.deleted = Some((c.revision, route, c.worker_id));
                    continue;
                }
                (ChangeKind::RouteUpsert, Some(route)) => {
                    if let Some((rev, moved, from)) = self.deleted
                        && rev + 1 == c.revision
                        && moved == route
                    {
                        self.moved(c, route, from);
                    }
                }
                (ChangeKind::WorkerDelete, _) => {
                    let name = self.name(c.worker_id);
                    self.push(Activity {
                        at: c.created_at,
                        kind: "worker",
                        route_id: None,
                        text: format!("worker {name} removed"),
                    });
                }
                _ => {}
            }
            self.deleted = None;
        }
    }

    fn moved(&mut self, c: &Change, route: Uuid, from: Option<Uuid>) {
        let from_status = from.and_then(|w| self.workers.get(&w)).map(|(_, s)| *s);
        let (from_name, to_name) = (self.name(from), self.name(c.worker_id));
        let (kind, why) = match from_status {
            Some(WorkerStatus::Lost) => ("failover", "its worker is Lost"),
            Some(WorkerStatus::Draining) | None => ("moved", "its worker is being removed"),
            Some(_) => ("moved", "re-placed"),
        };
        let activity = match c.worker_id {
            Some(_) => Activity {
                at: c.created_at,
                kind,
                route_id: Some(route),
                text: format!("route {route} moved from {from_name} to {to_name} ({why})"),
            },
            None => Activity {
                at: c.created_at,
                kind: "pending",
                route_id: Some(route),
                text: format!(
                    "route {route} left {from_name} ({why}) and waits: {}",
                    c.route
                        .as_ref()
                        .and_then(|r| r.pending_reason.clone())
                        .unwrap_or_else(|| "no worker can take it".to_owned())
                ),
            },
        };
        self.push(activity);
    }
}

impl Board {
    /// Starts following `hub`'s batches; while a page is open, the state is
    /// also refreshed every `refresh`.
    pub fn start(hub: &Hub, refresh: Duration) -> Board {
        let board = Board {
            inner: Arc::new(Inner {
                store: hub.store().clone(),
                hub: hub.clone(),
                recent: Mutex::default(),
                version: watch::channel(0).0,
                cache: tokio::sync::Mutex::new(None),
            }),
        };
        let batches = hub.batches();
        tokio::spawn(board.clone().follow(batches, refresh));
        board
    }

    /// Ticks whenever what the page shows may have changed.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.inner.version.subscribe()
    }

    /// Records a drift repair (or another event the change log does not
    /// tell) among the recent events.
    pub fn record(&self, activity: Activity) {
        self.inner
            .recent
            .lock()
            .expect("recent lock")
            .push(activity);
        self.bump();
    }

    fn bump(&self) {
        self.inner.version.send_modify(|v| *v += 1);
    }

    async fn follow(
        self,
        mut batches: broadcast::Receiver<Arc<crate::hub::Batch>>,
        refresh: Duration,
    ) {
        let stopped = self.inner.hub.stopped();
        tokio::pin!(stopped);
        self.read_workers().await;
        let mut tick = tokio::time::interval(refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                received = batches.recv() => match received {
                    Ok(batch) if !batch.changes.is_empty() => {
                        if batch.changes.iter().any(|c| {
                            matches!(c.kind, ChangeKind::WorkerUpsert | ChangeKind::WorkerDelete)
                        }) {
                            self.read_workers().await;
                        }
                        self.inner.recent.lock().expect("recent lock").changes(&batch.changes);
                    }
                    // Changes were skipped (an empty batch: the log was
                    // compacted under the tailer; or this receiver lagged):
                    // no move spans the gap, and the workers are read again.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.inner.recent.lock().expect("recent lock").deleted = None;
                        self.read_workers().await;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick() => {
                    if self.inner.version.receiver_count() == 0 {
                        continue;
                    }
                }
                () = &mut stopped => return,
            }
            self.bump();
        }
    }

    async fn read_workers(&self) {
        match self.inner.store.list_workers().await {
            Ok(workers) => self
                .inner
                .recent
                .lock()
                .expect("recent lock")
                .workers_now(&workers, Utc::now()),
            Err(e) => tracing::debug!(error = %e, "status page: cannot read the workers"),
        }
    }

    /// The page's content as JSON, at the current version (built once per
    /// version, whoever asks).
    pub async fn state_json(&self) -> Result<Arc<String>, StoreError> {
        let mut cache = self.inner.cache.lock().await;
        let version = *self.inner.version.borrow();
        if let Some((at, json)) = cache.as_ref()
            && *at == version
        {
            return Ok(json.clone());
        }
        let json = Arc::new(self.build().await?);
        *cache = Some((version, json.clone()));
        Ok(json)
    }

    async fn build(&self) -> Result<String, StoreError> {
        let store = &self.inner.store;
        let revision = self.inner.hub.handed_out();
        let workers = store.list_workers().await?;
        let mut routes = Vec::new();
        let mut cursor = None;
        let mut truncated = false;
        loop {
            let page = store
                .list_routes(&RouteFilter::default(), 1000, cursor)
                .await?;
            routes.extend(page.items);
            match page.next_cursor {
                Some(next) if routes.len() < ROUTES_SHOWN => cursor = Some(next),
                Some(_) => {
                    truncated = true;
                    break;
                }
                None => break,
            }
        }
        routes.truncate(ROUTES_SHOWN);
        let stranded = store.stranded_routes().await?;
        let recent: Vec<Activity> = {
            let recent = self.inner.recent.lock().expect("recent lock");
            recent.events.iter().cloned().collect()
        };
        let state = State {
            revision,
            generated_at: Utc::now(),
            workers: workers
                .into_iter()
                .map(|w| WorkerRow {
                    id: w.id,
                    backendai: w.backendai.is_some(),
                    name: w.name,
                    status: w.status,
                    routes: w.route_count,
                    capacity: w.capacity,
                    last_heartbeat: w.last_heartbeat,
                    revision_lag: w.revision_lag,
                    api_url: w.api_url,
                })
                .collect(),
            routes: routes
                .into_iter()
                .map(|r| RouteRow {
                    id: r.id,
                    worker_id: r.worker_id,
                    service: r.service,
                    app_mode: r.app_mode,
                    protocol: r.protocol,
                    url: r.frontend.url,
                    status: r.status,
                    pending_reason: r.pending_reason,
                    circuit: r.circuit.is_some(),
                    session_id: r.session_id,
                    endpoint_id: r.endpoint_id,
                })
                .collect(),
            routes_truncated: truncated,
            stranded: stranded
                .into_iter()
                .map(|s| StrandedRow {
                    route_id: s.route.id,
                    worker: s.worker.name,
                    url: s.route.frontend.url,
                    reason: s.reason,
                })
                .collect(),
            recent: &recent,
        };
        Ok(serde_json::to_string(&state).expect("the state serialises"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(revision: Revision, kind: ChangeKind, route: Uuid, worker: Option<Uuid>) -> Change {
        Change {
            revision,
            kind,
            route_id: Some(route),
            worker_id: worker,
            route: None,
            created_at: Utc::now(),
            trace: None,
        }
    }

    #[test]
    fn a_delete_then_an_upsert_of_the_same_route_is_a_move_and_named_by_why() {
        let (a, b, r) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let mut recent = Recent::default();
        recent.workers.insert(a, ("w-a".into(), WorkerStatus::Lost));
        recent
            .workers
            .insert(b, ("w-b".into(), WorkerStatus::Ready));
        recent.changes(&[
            change(7, ChangeKind::RouteDelete, r, Some(a)),
            change(8, ChangeKind::RouteUpsert, r, Some(b)),
        ]);
        let got = recent.events.front().expect("a move");
        assert_eq!(got.kind, "failover");
        assert!(got.text.contains("from w-a to w-b"), "{}", got.text);

        // A delete alone, or an upsert of another route after it, is no move.
        let mut recent = Recent::default();
        recent.changes(&[
            change(7, ChangeKind::RouteDelete, r, Some(a)),
            change(8, ChangeKind::RouteUpsert, Uuid::new_v4(), Some(b)),
            change(9, ChangeKind::RouteUpsert, r, Some(b)),
        ]);
        assert!(recent.events.is_empty());
    }

    fn worker(name: &str, status: WorkerStatus) -> crate::domain::Worker {
        let registration: crate::domain::WorkerRegistration =
            serde_json::from_value(serde_json::json!({"name": name, "api_url": "http://w:1",
                "frontend": {"mode": "port", "host": "h", "port_range": [1000, 1001]}}))
            .unwrap();
        let now = Utc::now();
        crate::domain::Worker::from_parts(
            Uuid::new_v4(),
            registration,
            status,
            now,
            0,
            0,
            0,
            now,
            now,
        )
    }

    #[test]
    fn workers_there_at_the_first_read_are_no_news_and_later_changes_are() {
        let mut recent = Recent::default();
        let mut a = worker("a", WorkerStatus::Ready);
        recent.workers_now(std::slice::from_ref(&a), Utc::now());
        assert!(recent.events.is_empty());
        a.status = WorkerStatus::Lost;
        let b = worker("b", WorkerStatus::Ready);
        recent.workers_now(&[a, b], Utc::now());
        let texts: Vec<&str> = recent.events.iter().map(|e| e.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "worker b registered (Ready)",
                "worker a is Lost (was Ready)"
            ]
        );
    }

    #[test]
    fn a_move_split_across_batches_is_still_a_move_and_the_ring_is_bounded() {
        let (a, r) = (Uuid::new_v4(), Uuid::new_v4());
        let mut recent = Recent::default();
        recent.changes(&[change(3, ChangeKind::RouteDelete, r, Some(a))]);
        recent.changes(&[change(4, ChangeKind::RouteUpsert, r, None)]);
        assert_eq!(recent.events.front().map(|e| e.kind), Some("pending"));
        for i in 0..(RECENT as i64 + 10) {
            recent.changes(&[
                change(10 + 2 * i, ChangeKind::RouteDelete, r, Some(a)),
                change(11 + 2 * i, ChangeKind::RouteUpsert, r, Some(a)),
            ]);
        }
        assert_eq!(recent.events.len(), RECENT);
    }
}
