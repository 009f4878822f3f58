//! The mirror's pure core: what the CRs should be, and what to write so that
//! they are. No I/O here.
//!
//! [`TokenBucket`] stays hand-written (25 lines) rather than `governor`: the
//! mirror plans its writes, so it asks the bucket for a *reservation* (take a
//! token now, answer how long until it may be used, so a burst of N writes
//! gets N staggered slots at once) at an instant it passes in. governor's
//! GCRA answers "allowed now" or "not until T" without taking anything, and
//! waits on its own clock (quanta) — a reservation would be a check/sleep
//! loop around it, plus its dependencies, for less than this does. Retry
//! delays do use a crate (`backon`, already in the tree through kube-runtime).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::crd::{AppProxyRouteSpec, AppProxyRouteStatus, RouteCondition, cr_name};
use crate::domain::failover::{self, Stranded};
use crate::domain::{Route, RouteStatus, Worker};

/// A CR as the API server has it (the parts the mirror compares).
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    /// `None` when the spec no longer parses (edited into nonsense).
    pub spec: Option<AppProxyRouteSpec>,
    pub status: Option<AppProxyRouteStatus>,
    pub generation: Option<i64>,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

/// What one CR should be.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub spec: AppProxyRouteSpec,
    pub status: AppProxyRouteStatus,
}

/// One write.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// The CR is missing: apply spec, then status.
    Create(String),
    /// The spec differs from the route (edited by hand, or the route changed):
    /// apply spec, then status.
    ApplySpec(String),
    /// Only the status is stale.
    ApplyStatus(String),
    /// The CR's route is gone.
    Delete(String),
}

impl Action {
    pub fn name(&self) -> &str {
        match self {
            Action::Create(n)
            | Action::ApplySpec(n)
            | Action::ApplyStatus(n)
            | Action::Delete(n) => n,
        }
    }
}

/// The desired CRs of `routes`, their status derived with `workers`.
pub fn desired(
    routes: &BTreeMap<Uuid, Route>,
    workers: &HashMap<Uuid, Worker>,
) -> BTreeMap<String, Desired> {
    routes
        .values()
        .map(|r| {
            let worker = r.worker_id.and_then(|w| workers.get(&w));
            (
                cr_name(r.id),
                Desired {
                    spec: AppProxyRouteSpec::of(r),
                    status: with_stranded(status_of(r, worker), r, worker, workers),
                },
            )
        })
        .collect()
}

/// The status of `route` on `worker`, without timestamps or generations
/// (those come from [`stamp`] at write time).
pub fn status_of(route: &Route, worker: Option<&Worker>) -> AppProxyRouteStatus {
    let phase = crate::domain::served::status(route.revision, worker);
    let propagated = worker.is_some_and(|w| w.acked_revision >= route.revision);
    let (ready, ready_reason, ready_message) = match phase {
        RouteStatus::Active => (
            "True",
            "Active",
            "the worker serves the latest revision".to_owned(),
        ),
        RouteStatus::Pending => (
            "False",
            "Pending",
            "no eligible worker has a free slot".to_owned(),
        ),
        RouteStatus::Propagating => (
            "False",
            "Propagating",
            "waiting for the worker to acknowledge the latest revision".to_owned(),
        ),
        RouteStatus::FailingOver => (
            "False",
            "FailingOver",
            "the worker is lost; the route is about to move".to_owned(),
        ),
    };
    let (prop, prop_reason, prop_message) = match (worker, propagated) {
        (None, _) => ("False", "NoWorker", "the route has no worker".to_owned()),
        (Some(w), true) => (
            "True",
            "Acknowledged",
            format!("worker {} acknowledged revision {}", w.name, route.revision),
        ),
        (Some(w), false) => (
            "False",
            "Propagating",
            format!(
                "worker {} has acknowledged revision {} of {}",
                w.name, w.acked_revision, route.revision
            ),
        ),
    };
    let epoch = DateTime::<Utc>::UNIX_EPOCH;
    let condition = |t: &str, s: &str, reason: &str, message: String| RouteCondition {
        type_: t.to_owned(),
        status: s.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: epoch,
        observed_generation: None,
    };
    AppProxyRouteStatus {
        phase: phase.as_str().to_owned(),
        worker: worker.map(|w| w.name.clone()),
        url: route.frontend.url.clone(),
        revision: route.revision,
        acked_revision: propagated.then_some(route.revision),
        observed_generation: None,
        conditions: vec![
            condition("Ready", ready, ready_reason, ready_message),
            condition("Propagated", prop, prop_reason, prop_message),
        ],
    }
}

/// A Backend.AI circuit's CR also carries the `Stranded` condition: `True`
/// (reason `UrlWouldChange`) while its worker is lost and no ready worker
/// would serve it at the same URL, so it stays on that worker (the rule is
/// [`failover::stranded`]); `False` otherwise. Native routes have no such
/// condition.
pub fn with_stranded(
    mut status: AppProxyRouteStatus,
    route: &Route,
    worker: Option<&Worker>,
    workers: &HashMap<Uuid, Worker>,
) -> AppProxyRouteStatus {
    if route.circuit.is_none() {
        return status;
    }
    let stranded = worker.and_then(|w| failover::stranded(route, w, workers.values()));
    let (s, reason, message) = match stranded {
        Some(why) => {
            if let Some(ready) = status.conditions.iter_mut().find(|c| c.type_ == "Ready") {
                ready.message =
                    "the worker is lost; the circuit stays on it until it comes back".to_owned();
            }
            ("True", Stranded::REASON, why.message)
        }
        None => (
            "False",
            "UrlKept",
            "the circuit moves only where its URL stays the same".to_owned(),
        ),
    };
    status.conditions.push(RouteCondition {
        type_: "Stranded".to_owned(),
        status: s.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: DateTime::<Utc>::UNIX_EPOCH,
        observed_generation: None,
    });
    status
}

/// Fills in `observedGeneration` and each condition's `lastTransitionTime`:
/// kept from `previous` when the condition's status did not change, else `now`
/// in whole seconds (as Kubernetes keeps condition times).
pub fn stamp(
    mut status: AppProxyRouteStatus,
    previous: Option<&AppProxyRouteStatus>,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> AppProxyRouteStatus {
    let now = chrono::SubsecRound::trunc_subsecs(now, 0);
    status.observed_generation = generation;
    for c in &mut status.conditions {
        c.observed_generation = generation;
        c.last_transition_time = previous
            .and_then(|p| p.conditions.iter().find(|o| o.type_ == c.type_))
            .filter(|o| o.status == c.status)
            .map_or(now, |o| o.last_transition_time);
    }
    status
}

/// True when `observed` already says what `desired` says, for a CR at `generation`.
pub fn status_matches(
    desired: &AppProxyRouteStatus,
    observed: &AppProxyRouteStatus,
    generation: Option<i64>,
) -> bool {
    let same_conditions = desired.conditions.len() == observed.conditions.len()
        && desired
            .conditions
            .iter()
            .zip(&observed.conditions)
            .all(|(d, o)| {
                d.type_ == o.type_
                    && d.status == o.status
                    && d.reason == o.reason
                    && d.message == o.message
            });
    desired.phase == observed.phase
        && desired.worker == observed.worker
        && desired.url == observed.url
        && desired.revision == observed.revision
        && desired.acked_revision == observed.acked_revision
        && observed.observed_generation == generation
        && same_conditions
}

/// The writes that make `observed` (the managed CRs) match `desired`, in a
/// stable order: creates, spec repairs, status updates, deletes.
pub fn plan(
    desired: &BTreeMap<String, Desired>,
    observed: &BTreeMap<String, Observed>,
) -> Vec<Action> {
    let mut actions = Vec::new();
    for (name, want) in desired {
        match observed.get(name) {
            None => actions.push(Action::Create(name.clone())),
            Some(have) if have.spec.as_ref() != Some(&want.spec) => {
                actions.push(Action::ApplySpec(name.clone()));
            }
            Some(have) => {
                let fresh = have
                    .status
                    .as_ref()
                    .is_some_and(|s| status_matches(&want.status, s, have.generation));
                if !fresh {
                    actions.push(Action::ApplyStatus(name.clone()));
                }
            }
        }
    }
    for name in observed.keys() {
        if !desired.contains_key(name) {
            actions.push(Action::Delete(name.clone()));
        }
    }
    actions.sort();
    actions
}

/// The fields of `have` that `want` lacks, as a JSON merge patch setting each
/// to `null` (nested objects recursively); `None` when there are none.
pub fn extra_fields(
    have: &serde_json::Value,
    want: &serde_json::Value,
) -> Option<serde_json::Value> {
    let (serde_json::Value::Object(have), serde_json::Value::Object(want)) = (have, want) else {
        return None;
    };
    let mut patch = serde_json::Map::new();
    for (k, v) in have {
        match want.get(k) {
            None => {
                patch.insert(k.clone(), serde_json::Value::Null);
            }
            Some(w) => {
                if let Some(inner) = extra_fields(v, w) {
                    patch.insert(k.clone(), inner);
                }
            }
        }
    }
    (!patch.is_empty()).then_some(serde_json::Value::Object(patch))
}

/// A token bucket: `rate` writes per second on average, bursts of `burst`.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: u32, now: std::time::Instant) -> TokenBucket {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate: rate.max(0.001),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token; returns how long to wait before using it.
    pub fn take(&mut self, now: std::time::Instant) -> std::time::Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - 1.0;
        if self.tokens >= 0.0 {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{
        Access, AppMode, Frontend, Protocol, Target, WorkerFrontend, WorkerStatus,
    };
    use std::time::{Duration, Instant};

    fn route(revision: i64, worker: Option<Uuid>) -> Route {
        let now = Utc::now();
        Route {
            id: Uuid::new_v4(),
            app_mode: AppMode::Interactive,
            session_id: Some(Uuid::new_v4()),
            endpoint_id: None,
            service: "jupyter".into(),
            protocol: Protocol::Http,
            targets: vec![Target {
                id: None,
                host: "10.0.0.1".into(),
                port: 8888,
                weight: 1,
                session_id: None,
            }],
            frontend: Frontend {
                mode: None,
                port: Some(10205),
                subdomain: None,
                url: Some("http://proxy:10205".into()),
            },
            worker_id: worker,
            pending_reason: None,
            access: Access::default(),
            labels: BTreeMap::from([("team".into(), "a".into())]),
            envs: BTreeMap::new(),
            args: Some(serde_json::json!({"x": [1, 2]})),
            health_check: None,
            expires_at: None,
            circuit: None,
            status: RouteStatus::Pending,
            revision,
            created_at: now,
            updated_at: now,
        }
    }

    fn worker(id: Uuid, acked: i64, status: WorkerStatus) -> Worker {
        let now = Utc::now();
        Worker {
            id,
            name: "worker-1".into(),
            api_url: "http://w".into(),
            frontend: WorkerFrontend::Port {
                host: "proxy".into(),
                port_range: [10205, 10300],
            },
            protocols: Protocol::ALL.to_vec(),
            app_modes: AppMode::ALL.to_vec(),
            labels: BTreeMap::new(),
            pod: None,
            capacity: None,
            backendai: None,
            status,
            last_heartbeat: now,
            acked_revision: acked,
            revision_lag: 0,
            route_count: 1,
            created_at: now,
            updated_at: now,
        }
    }

    /// What the API server would hold after the mirror wrote `d` at `generation`.
    fn written(d: &Desired, generation: i64) -> Observed {
        Observed {
            spec: Some(d.spec.clone()),
            status: Some(stamp(d.status.clone(), None, Some(generation), Utc::now())),
            generation: Some(generation),
            uid: None,
            resource_version: None,
        }
    }

    #[test]
    fn missing_crs_are_created_and_orphans_deleted() {
        let w = Uuid::new_v4();
        let r = route(3, Some(w));
        let routes = BTreeMap::from([(r.id, r.clone())]);
        let workers = HashMap::from([(w, worker(w, 3, WorkerStatus::Ready))]);
        let want = desired(&routes, &workers);
        let orphan = cr_name(Uuid::new_v4());
        let mut observed = BTreeMap::new();
        observed.insert(orphan.clone(), written(&want[&cr_name(r.id)], 1));
        assert_eq!(
            plan(&want, &observed),
            [Action::Create(cr_name(r.id)), Action::Delete(orphan)]
        );
    }

    #[test]
    fn converged_crs_need_nothing_and_hand_edits_are_reapplied() {
        let w = Uuid::new_v4();
        let r = route(3, Some(w));
        let name = cr_name(r.id);
        let routes = BTreeMap::from([(r.id, r.clone())]);
        let workers = HashMap::from([(w, worker(w, 3, WorkerStatus::Ready))]);
        let want = desired(&routes, &workers);
        let mut observed = BTreeMap::from([(name.clone(), written(&want[&name], 1))]);
        assert!(plan(&want, &observed).is_empty());

        // Someone edits the spec by hand.
        let have = observed.get_mut(&name).unwrap();
        have.spec.as_mut().unwrap().targets[0].port = 9999;
        have.generation = Some(2);
        assert_eq!(plan(&want, &observed), [Action::ApplySpec(name.clone())]);

        // A spec that no longer parses is drift too.
        observed.get_mut(&name).unwrap().spec = None;
        assert_eq!(plan(&want, &observed), [Action::ApplySpec(name.clone())]);
    }

    #[test]
    fn status_follows_acknowledgement_worker_health_and_generation() {
        let w = Uuid::new_v4();
        let r = route(5, Some(w));
        let name = cr_name(r.id);
        let routes = BTreeMap::from([(r.id, r.clone())]);
        let lagging = HashMap::from([(w, worker(w, 4, WorkerStatus::Ready))]);
        let want = desired(&routes, &lagging);
        let s = &want[&name].status;
        assert_eq!(s.phase, "Propagating");
        assert_eq!(s.acked_revision, None);
        assert_eq!(s.worker.as_deref(), Some("worker-1"));
        assert_eq!(s.conditions[1].status, "False");
        let observed = BTreeMap::from([(name.clone(), written(&want[&name], 1))]);

        let acked = HashMap::from([(w, worker(w, 5, WorkerStatus::Ready))]);
        let want = desired(&routes, &acked);
        assert_eq!(want[&name].status.phase, "Active");
        assert_eq!(want[&name].status.acked_revision, Some(5));
        assert_eq!(plan(&want, &observed), [Action::ApplyStatus(name.clone())]);

        let lost = HashMap::from([(w, worker(w, 5, WorkerStatus::Lost))]);
        assert_eq!(desired(&routes, &lost)[&name].status.phase, "FailingOver");

        // A status written for an older generation is stale.
        let mut old = written(&want[&name], 1);
        old.generation = Some(2);
        let observed = BTreeMap::from([(name.clone(), old)]);
        assert_eq!(plan(&want, &observed), [Action::ApplyStatus(name)]);

        let pending = route(1, None);
        let s = status_of(&pending, None);
        assert_eq!((s.phase.as_str(), s.worker.as_deref()), ("Pending", None));
    }

    #[test]
    fn a_stranded_circuit_s_cr_says_so_and_native_routes_carry_no_such_condition() {
        let w = Uuid::new_v4();
        let native = route(5, Some(w));
        let mut circuit = route(5, Some(w));
        circuit.id = Uuid::new_v4();
        circuit.circuit = Some(Default::default());
        let routes = BTreeMap::from([(native.id, native.clone()), (circuit.id, circuit.clone())]);
        let ready = HashMap::from([(w, worker(w, 5, WorkerStatus::Ready))]);
        let want = desired(&routes, &ready);
        assert_eq!(want[&cr_name(native.id)].status.conditions.len(), 2);
        let kept = &want[&cr_name(circuit.id)].status.conditions[2];
        assert_eq!(
            (
                kept.type_.as_str(),
                kept.status.as_str(),
                kept.reason.as_str()
            ),
            ("Stranded", "False", "UrlKept")
        );

        // Lost, and no other worker serves host `proxy`: it stays, and the CR says why.
        let mut other = worker(Uuid::new_v4(), 5, WorkerStatus::Ready);
        other.frontend = WorkerFrontend::Port {
            host: "elsewhere".into(),
            port_range: [10205, 10300],
        };
        let lost = HashMap::from([(w, worker(w, 5, WorkerStatus::Lost)), (other.id, other)]);
        let want = desired(&routes, &lost);
        let status = &want[&cr_name(circuit.id)].status;
        assert_eq!(status.phase, "FailingOver");
        let c = &status.conditions[2];
        assert_eq!(
            (c.type_.as_str(), c.status.as_str(), c.reason.as_str()),
            ("Stranded", "True", "UrlWouldChange")
        );
        assert!(
            c.message.contains("http://proxy:10205") && c.message.contains("worker-1"),
            "{}",
            c.message
        );
        assert!(status.conditions[0].message.contains("stays on it"));
        // The native route on the same worker is about to move, as before.
        let native_status = &want[&cr_name(native.id)].status;
        assert_eq!(native_status.conditions.len(), 2);
        assert!(
            native_status.conditions[0]
                .message
                .contains("about to move")
        );
        // Whole-second transition times, like the other conditions.
        let at = DateTime::<Utc>::from_timestamp(1_000, 0).unwrap()
            + chrono::Duration::milliseconds(250);
        let stamped = stamp(status.clone(), None, Some(1), at);
        assert_eq!(
            stamped.conditions[2].last_transition_time,
            DateTime::<Utc>::from_timestamp(1_000, 0).unwrap()
        );
    }

    #[test]
    fn transition_times_move_only_when_a_condition_flips() {
        let w = Uuid::new_v4();
        let r = route(5, Some(w));
        let t0 = DateTime::<Utc>::from_timestamp(1_000, 0).unwrap();
        let t1 = DateTime::<Utc>::from_timestamp(2_000, 0).unwrap();
        let lagging = worker(w, 4, WorkerStatus::Ready);
        let first = stamp(status_of(&r, Some(&lagging)), None, Some(1), t0);
        assert!(
            first
                .conditions
                .iter()
                .all(|c| c.last_transition_time == t0)
        );
        let acked = worker(w, 5, WorkerStatus::Ready);
        let second = stamp(status_of(&r, Some(&acked)), Some(&first), Some(1), t1);
        assert_eq!(second.conditions[0].last_transition_time, t1); // Ready flipped
        let third = stamp(
            status_of(&r, Some(&acked)),
            Some(&second),
            Some(2),
            t1 + chrono::Duration::seconds(5),
        );
        assert_eq!(third.conditions[0].last_transition_time, t1);
        assert_eq!(third.observed_generation, Some(2));

        // Whole seconds, as Kubernetes keeps condition times.
        let odd = t0 + chrono::Duration::nanoseconds(123_456_789);
        let fresh = stamp(status_of(&r, Some(&acked)), None, Some(1), odd);
        assert!(
            fresh
                .conditions
                .iter()
                .all(|c| c.last_transition_time == t0)
        );
    }

    #[test]
    fn extra_fields_become_nulls() {
        let have = serde_json::json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1], "f": {"g": 1}});
        let want = serde_json::json!({"a": 2, "b": {"c": 2}, "e": [], "f": {"g": 1}});
        assert_eq!(
            extra_fields(&have, &want),
            Some(serde_json::json!({"b": {"d": null}}))
        );
        assert_eq!(extra_fields(&want, &want), None);
        let more = serde_json::json!({"a": 2, "b": {"c": 2}, "e": [], "f": {"g": 1}, "x": true});
        assert_eq!(
            extra_fields(&more, &want),
            Some(serde_json::json!({"x": null}))
        );
    }

    #[test]
    fn the_token_bucket_allows_a_burst_then_paces() {
        let t = Instant::now();
        let mut b = TokenBucket::new(10.0, 3, t);
        for _ in 0..3 {
            assert_eq!(b.take(t), Duration::ZERO);
        }
        let wait = b.take(t);
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        // A second later the bucket is full again (capped at the burst).
        let later = t + Duration::from_secs(1);
        for _ in 0..3 {
            assert_eq!(b.take(later), Duration::ZERO);
        }
        assert!(b.take(later) > Duration::ZERO);
    }
}
