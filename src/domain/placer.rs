//! Placing several routes in a row: the workers they may go to, with each
//! worker's taken frontends and route count kept current as routes land.
//!
//! Creates, failover and pending placement all place through a [`Placer`].
//! It is pure: when it needs to know what a worker already serves it says so
//! ([`Step::NeedUsed`]), the store reads it and hands it over with
//! [`Placer::know_used`], and placement goes on. So a worker's frontends are
//! read at most once per batch, and only for workers actually tried.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use uuid::Uuid;

use super::placement::{self, Assignment, PlacementError, Used};
use super::route::RouteSpec;
use super::worker::Worker;

/// Workers and what is taken on them, for one batch of placements.
#[derive(Clone, Debug, Default)]
pub struct Placer {
    workers: Vec<Worker>,
    used: HashMap<Uuid, Used>,
}

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
        Placer { workers, used }
    }

    pub fn workers(&self) -> &[Worker] {
        &self.workers
    }

    pub fn worker(&self, id: Uuid) -> Option<&Worker> {
        self.workers.iter().find(|w| w.id == id)
    }

    /// Records what is taken on `worker`, as read from the store.
    pub fn know_used(&mut self, worker: Uuid, used: Used) {
        self.used.insert(worker, used);
    }

    /// Everything known to be taken, including this batch's placements.
    pub fn into_used(self) -> HashMap<Uuid, Used> {
        self.used
    }

    /// Places `spec` on the most preferred worker with room, by the rules of
    /// [`placement::rank`] and [`placement::allocate`], and records it.
    pub fn place(&mut self, spec: &RouteSpec) -> Result<Step, PlacementError> {
        let mut failure =
            PlacementError::NoEligibleWorker("every eligible worker is full".to_owned());
        let mut chosen = None;
        for w in placement::rank(&self.workers, spec)? {
            let Some(used) = self.used.get(&w.id) else {
                return Ok(Step::NeedUsed(w.id));
            };
            match placement::allocate(w, spec, used) {
                Ok(Some(assignment)) => {
                    chosen = Some((w.id, assignment));
                    break;
                }
                Ok(None) => {}
                Err(e) => failure = e,
            }
        }
        let (id, assignment) = chosen.ok_or(failure)?;
        let taken = match self.used.entry(id) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(Used::default()),
        };
        taken.ports.extend(assignment.port());
        taken
            .subdomains
            .extend(assignment.subdomain().map(str::to_owned));
        let worker = self
            .workers
            .iter_mut()
            .find(|w| w.id == id)
            .expect("placed on a candidate");
        worker.route_count += 1;
        Ok(Step::Placed(Box::new(worker.clone()), assignment))
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::domain::{WorkerRegistration, WorkerStatus};

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
        stored.insert(
            a.id,
            Used {
                ports: [100].into(),
                ..Used::default()
            },
        );
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
        stored.insert(
            a.id,
            Used {
                ports: [100].into(),
                ..Used::default()
            },
        );
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
        stored.insert(
            a.id,
            Used {
                ports: [105].into(),
                ..Used::default()
            },
        );
        let mut placer = Placer::new(vec![a.clone()], HashMap::new());
        let mut pinned = spec();
        pinned.worker_id = Some(a.id);
        pinned.frontend.port = Some(105);
        let err = place(&mut placer, &pinned, &stored, &mut Vec::new()).unwrap_err();
        assert_eq!(err, PlacementError::PortTaken(105));
    }
}
