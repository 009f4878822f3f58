//! Placing several routes in a row: the workers they may go to, with each
//! worker's taken frontends and route count kept current as routes land.
//!
//! Creates, failover and pending placement all place through a [`Placer`].
//! It is pure: when it needs to know what a worker already serves it says so
//! ([`Step::NeedUsed`]), the store reads it and hands it over with
//! [`Placer::know_used`], and placement goes on. So a worker's frontends are
//! read at most once per batch, and only for workers actually tried.
//!
//! The candidates are kept in the order [`placement::rank`] gives (load, then
//! count, then name), so placing one route walks the workers from the least
//! loaded and stops at the first that has room, instead of ranking every
//! worker again: with thousands of workers a placement costs a few lookups.
//! The create writer keeps one `Placer` between batches and refreshes only
//! the workers that changed ([`Placer::refresh`]).

use std::cmp::Ordering;
use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};

use uuid::Uuid;

use super::app_filter::Dedications;
use super::placement::{self, Assignment, PlacementError, Used};
use super::route::RouteSpec;
use super::types::WorkerFrontend;
use super::types::WorkerStatus;
use super::worker::Worker;

/// Workers and what is taken on them, for one batch of placements.
#[derive(Clone, Debug, Default)]
pub struct Placer {
    workers: Vec<Worker>,
    used: HashMap<Uuid, Used>,
    /// Position of each worker in `workers`.
    index: HashMap<Uuid, usize>,
    /// Every worker in placement order; built on the first unpinned placement.
    order: Option<BTreeSet<RankKey>>,
    /// The app filters of every worker: whether a route is dedicated.
    dedications: Dedications,
}

/// A worker's place in the order of [`placement::rank`]: load as a fraction
/// of capacity, then absolute count, then name.
#[derive(Clone, Debug)]
struct RankKey {
    load: f64,
    count: u64,
    name: String,
    at: usize,
}

impl RankKey {
    fn of(worker: &Worker, at: usize) -> RankKey {
        RankKey {
            load: (worker.route_count as f64) / (worker.max_routes() as f64),
            count: worker.route_count,
            name: worker.name.clone(),
            at,
        }
    }
}

impl Ord for RankKey {
    fn cmp(&self, other: &RankKey) -> Ordering {
        self.load
            .total_cmp(&other.load)
            .then(self.count.cmp(&other.count))
            .then_with(|| self.name.cmp(&other.name))
            .then(self.at.cmp(&other.at))
    }
}
impl PartialOrd for RankKey {
    fn partial_cmp(&self, other: &RankKey) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for RankKey {
    fn eq(&self, other: &RankKey) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for RankKey {}

/// What one attempt to place a route came to.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Placed on this worker (as it is now, with the route counted) at this
    /// frontend; both are already recorded.
    Placed(Box<Worker>, Assignment),
    /// The frontends taken on this worker are needed to go on.
    NeedUsed(Uuid),
}

impl Placer {
    /// `workers` are the candidates; `used` what is already known to be taken
    /// on some of them (e.g. kept from an earlier batch).
    pub fn new(workers: Vec<Worker>, used: HashMap<Uuid, Used>) -> Placer {
        let index = workers.iter().enumerate().map(|(i, w)| (w.id, i)).collect();
        let dedications = Dedications::of(&workers);
        Placer {
            workers,
            used,
            index,
            order: None,
            dedications,
        }
    }

    pub fn workers(&self) -> &[Worker] {
        &self.workers
    }

    pub fn worker(&self, id: Uuid) -> Option<&Worker> {
        self.index.get(&id).map(|&i| &self.workers[i])
    }

    /// What is known to be taken on `worker` (placements made with this
    /// placer included), if it is known.
    pub fn used(&self, worker: Uuid) -> Option<&Used> {
        self.used.get(&worker)
    }

    /// Records what is taken on `worker`, as read from the store.
    pub fn know_used(&mut self, worker: Uuid, used: Used) {
        self.used.insert(worker, used);
    }

    /// Workers whose taken frontends placement may need next, `first` (what
    /// [`Step::NeedUsed`] asked for) and then up to `limit - 1` more, the
    /// next candidates in placement order not yet known: so the store reads
    /// them in one query instead of one query each as routes spread over
    /// many workers.
    pub fn unknown_ahead(&self, first: Uuid, limit: usize) -> Vec<Uuid> {
        let mut ids = vec![first];
        if let Some(order) = &self.order {
            ids.extend(
                order
                    .iter()
                    .map(|k| &self.workers[k.at])
                    .filter(|w| {
                        w.id != first
                            && w.status == WorkerStatus::Ready
                            && w.route_count < w.max_routes()
                            && !self.used.contains_key(&w.id)
                    })
                    .map(|w| w.id)
                    .take(limit.saturating_sub(1)),
            );
        }
        ids
    }

    /// Everything known to be taken, including this batch's placements.
    pub fn into_used(self) -> HashMap<Uuid, Used> {
        self.used
    }

    /// Forgets what is taken on `worker` (it will be asked for again).
    pub fn forget_used(&mut self, worker: Uuid) {
        self.used.remove(&worker);
    }

    /// Records a frontend taken on `worker` by a route placed elsewhere (say
    /// by another replica), if what is taken there is known.
    pub fn note_taken(&mut self, worker: Uuid, port: Option<u16>, subdomain: Option<String>) {
        if let Some(used) = self.used.get_mut(&worker) {
            used.ports.extend(port);
            used.subdomains.extend(subdomain);
        }
    }

    /// Replaces what is known of the workers in `changed` (as read again from
    /// the store; an id missing from `fresh` no longer exists); what is taken
    /// on them stays known unless forgotten ([`Placer::forget_used`]), and
    /// everything else stays as it is.
    pub fn refresh(&mut self, changed: &[Uuid], fresh: Vec<Worker>) {
        let mut gone: Vec<Uuid> = Vec::new();
        let mut fresh: HashMap<Uuid, Worker> = fresh.into_iter().map(|w| (w.id, w)).collect();
        for id in changed {
            match (self.index.get(id).copied(), fresh.remove(id)) {
                (Some(i), Some(w)) => {
                    self.dedications.remove(&self.workers[i]);
                    self.dedications.add(&w);
                    if let Some(order) = &mut self.order {
                        order.remove(&RankKey::of(&self.workers[i], i));
                        order.insert(RankKey::of(&w, i));
                    }
                    self.workers[i] = w;
                }
                (None, Some(w)) => {
                    self.dedications.add(&w);
                    let i = self.workers.len();
                    if let Some(order) = &mut self.order {
                        order.insert(RankKey::of(&w, i));
                    }
                    self.index.insert(w.id, i);
                    self.workers.push(w);
                }
                (Some(i), None) => {
                    self.dedications.remove(&self.workers[i]);
                    gone.push(*id);
                }
                (None, None) => {}
            }
        }
        if !gone.is_empty() {
            for id in &gone {
                self.used.remove(id);
            }
            self.workers.retain(|w| !gone.contains(&w.id));
            self.index = self
                .workers
                .iter()
                .enumerate()
                .map(|(i, w)| (w.id, i))
                .collect();
            self.order = None;
        }
    }

    /// Places `spec` on the most preferred worker with room, by the rules of
    /// [`placement::rank`] and [`placement::allocate`], and records it.
    pub fn place(&mut self, spec: &RouteSpec) -> Result<Step, PlacementError> {
        let mut failure =
            PlacementError::NoEligibleWorker("every eligible worker is full".to_owned());
        let mut chosen = None;
        let dedicated = self.dedications.is_dedicated(spec);
        match spec.worker_id {
            Some(id) => {
                let i = *self
                    .index
                    .get(&id)
                    .ok_or(PlacementError::UnknownWorker(id))?;
                // The one candidate: rank says why it cannot take the route.
                let pinned = std::slice::from_ref(&self.workers[i]);
                for w in placement::rank_with(pinned, spec, dedicated)? {
                    let Some(used) = self.used.get(&w.id) else {
                        return Ok(Step::NeedUsed(w.id));
                    };
                    match placement::allocate(w, spec, used) {
                        Ok(Some(assignment)) => chosen = Some((i, assignment)),
                        Ok(None) => {}
                        Err(e) => failure = e,
                    }
                }
            }
            None => {
                let workers = &self.workers;
                let order = self.order.get_or_insert_with(|| {
                    workers
                        .iter()
                        .enumerate()
                        .map(|(i, w)| RankKey::of(w, i))
                        .collect()
                });
                let mut eligible = false;
                for key in order.iter() {
                    let w = &workers[key.at];
                    // The cheap necessary conditions first: most workers
                    // passed over are not ready or full, and wording why
                    // costs an allocation.
                    let may = w.status == WorkerStatus::Ready
                        && w.route_count < w.max_routes()
                        && w.protocols.contains(&spec.protocol)
                        && w.app_modes.contains(&spec.app_mode);
                    if !may || placement::ineligibility(w, spec, dedicated).is_some() {
                        continue;
                    }
                    eligible = true;
                    let Some(used) = self.used.get(&w.id) else {
                        return Ok(Step::NeedUsed(w.id));
                    };
                    match placement::allocate(w, spec, used) {
                        Ok(Some(assignment)) => {
                            chosen = Some((key.at, assignment));
                            break;
                        }
                        Ok(None) => {}
                        Err(e) => failure = e,
                    }
                }
                if !eligible {
                    // No candidate at all: rank words the reasons.
                    placement::rank_with(&self.workers, spec, dedicated)?;
                }
            }
        }
        let (at, assignment) = chosen.ok_or(failure)?;
        let id = self.workers[at].id;
        let taken = match self.used.entry(id) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(Used::default()),
        };
        let low = match &self.workers[at].frontend {
            WorkerFrontend::Port { port_range, .. } => Some(port_range[0]),
            WorkerFrontend::Wildcard { .. } => None,
        };
        taken.take(&assignment, low);
        if let Some(order) = &mut self.order {
            order.remove(&RankKey::of(&self.workers[at], at));
        }
        let worker = &mut self.workers[at];
        worker.route_count += 1;
        if let Some(order) = &mut self.order {
            order.insert(RankKey::of(worker, at));
        }
        Ok(Step::Placed(Box::new(worker.clone()), assignment))
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::domain::{WorkerRegistration, WorkerStatus};

    fn ports_used(ports: &[u16]) -> Used {
        let mut used = Used::default();
        used.ports.extend(ports);
        used
    }

    fn worker(name: &str, range: [u16; 2], routes: u64) -> Worker {
        let registration: WorkerRegistration = serde_json::from_value(serde_json::json!({
            "name": name, "api_url": "http://w",
            "frontend": {"mode": "port", "host": "h", "port_range": range}
        }))
        .unwrap();
        let now = Utc::now();
        Worker::from_parts(
            Uuid::now_v7(),
            registration,
            WorkerStatus::Ready,
            now,
            0,
            0,
            routes,
            now,
            now,
        )
    }

    fn spec() -> RouteSpec {
        serde_json::from_value(serde_json::json!({
            "session_id": Uuid::now_v7(), "service": "jupyter",
            "targets": [{"host": "10.0.0.1", "port": 8888}]
        }))
        .unwrap()
    }

    /// Places `spec`, answering the placer's questions from `stored`.
    fn place(
        placer: &mut Placer,
        spec: &RouteSpec,
        stored: &HashMap<Uuid, Used>,
        asked: &mut Vec<Uuid>,
    ) -> Result<(Worker, Assignment), PlacementError> {
        loop {
            match placer.place(spec)? {
                Step::Placed(w, a) => return Ok((*w, a)),
                Step::NeedUsed(id) => {
                    asked.push(id);
                    placer.know_used(id, stored.get(&id).cloned().unwrap_or_default());
                }
            }
        }
    }

    #[test]
    fn consecutive_routes_take_consecutive_ports_and_count_on_their_worker() {
        let a = worker("a", [100, 102], 0);
        let mut stored = HashMap::new();
        stored.insert(a.id, ports_used(&[100]));
        let mut placer = Placer::new(vec![a.clone()], HashMap::new());
        let mut asked = Vec::new();
        let (w1, p1) = place(&mut placer, &spec(), &stored, &mut asked).unwrap();
        let (w2, p2) = place(&mut placer, &spec(), &stored, &mut asked).unwrap();
        assert_eq!((p1, p2), (Assignment::Port(101), Assignment::Port(102)));
        assert_eq!((w1.route_count, w2.route_count), (1, 2));
        // The worker's frontends were read once, for the first route only.
        assert_eq!(asked, vec![a.id]);
        let full = place(&mut placer, &spec(), &stored, &mut asked).unwrap_err();
        assert_eq!(
            full,
            PlacementError::NoEligibleWorker("every eligible worker is full".into())
        );
        assert!(placer.into_used()[&a.id].ports.contains(&102));
    }

    #[test]
    fn routes_spread_to_the_least_loaded_worker_as_counts_change() {
        let a = worker("a", [100, 199], 1);
        let b = worker("b", [200, 299], 0);
        let mut placer = Placer::new(vec![a.clone(), b.clone()], HashMap::new());
        let (mut asked, stored) = (Vec::new(), HashMap::new());
        let order: Vec<Uuid> = (0..4)
            .map(|_| {
                place(&mut placer, &spec(), &stored, &mut asked)
                    .unwrap()
                    .0
                    .id
            })
            .collect();
        // b (empty) first; then tied at one route each, a by name; then b again.
        assert_eq!(order, vec![b.id, a.id, b.id, a.id]);
        assert_eq!(asked, vec![b.id, a.id]);
    }

    #[test]
    fn a_worker_without_room_is_passed_over_for_the_next_one() {
        let a = worker("a", [100, 100], 0);
        let b = worker("b", [200, 200], 0);
        let mut stored = HashMap::new();
        // The count says a has room, but its only port is taken.
        stored.insert(a.id, ports_used(&[100]));
        let mut placer = Placer::new(vec![a.clone(), b.clone()], HashMap::new());
        let mut asked = Vec::new();
        let (w, port) = place(&mut placer, &spec(), &stored, &mut asked).unwrap();
        assert_eq!((w.id, port), (b.id, Assignment::Port(200)));
        assert_eq!(asked, vec![a.id, b.id]);
    }

    #[test]
    fn a_requested_port_in_use_is_reported_as_taken() {
        let a = worker("a", [100, 110], 0);
        let mut stored = HashMap::new();
        stored.insert(a.id, ports_used(&[105]));
        let mut placer = Placer::new(vec![a.clone()], HashMap::new());
        let mut pinned = spec();
        pinned.worker_id = Some(a.id);
        pinned.frontend.port = Some(105);
        let err = place(&mut placer, &pinned, &stored, &mut Vec::new()).unwrap_err();
        assert_eq!(err, PlacementError::PortTaken(105));
    }

    #[test]
    fn the_kept_order_chooses_what_rank_chooses_and_follows_refreshes() {
        let mut workers: Vec<Worker> = (0..40u16)
            .map(|i| {
                let low = 1000 + i * 10;
                worker(
                    &format!("w{i:02}"),
                    [low, low + 4 + i % 3],
                    u64::from(i % 4),
                )
            })
            .collect();
        workers[3].status = WorkerStatus::NotReady;
        let mut placer = Placer::new(workers.clone(), HashMap::new());
        let stored = HashMap::new();
        let mut naive = workers.clone();
        for round in 0..150 {
            if round == 50 {
                // Another write changed two workers: one is gone, one is back.
                let mut back = naive[3].clone();
                back.status = WorkerStatus::Ready;
                let gone = naive[7].id;
                naive.retain(|w| w.id != gone);
                let at = naive.iter().position(|w| w.id == back.id).unwrap();
                naive[at] = back.clone();
                placer.refresh(&[gone, back.id], vec![back]);
            }
            let spec = spec();
            let expected = placement::rank(&naive, &spec).ok().and_then(|ranked| {
                ranked.into_iter().find_map(|w| {
                    let used = placer.used.get(&w.id).cloned().unwrap_or_default();
                    placement::allocate(w, &spec, &used)
                        .ok()
                        .flatten()
                        .map(|a| (w.id, a))
                })
            });
            let got = place(&mut placer, &spec, &stored, &mut Vec::new())
                .ok()
                .map(|(w, a)| (w.id, a));
            assert_eq!(got, expected, "round {round}");
            let Some((id, _)) = got else { break };
            naive.iter_mut().find(|w| w.id == id).unwrap().route_count += 1;
        }
    }
}
