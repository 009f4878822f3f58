//! App filters: workers dedicated to some apps (Backend.AI's `app_filters`
//! and `filtered_apps_only`).
//!
//! A worker's filter is a property name and a value (`session.domain_name` =
//! `gpu-team`, `endpoint.runtime_variant` = `vllm`); a route's properties are
//! what the Manager said of its session and endpoint
//! ([`CircuitInfo::properties`]). The rule:
//!
//! - a route **matches** a worker when one of the worker's filters equals one
//!   of the route's properties;
//! - a route is **dedicated** when it matches some registered worker,
//!   whatever that worker's state: it then goes only to workers it matches
//!   (when they are all Lost or full it waits for them, as upstream does, and
//!   does not spill onto the other workers);
//! - any other route goes only to workers without `filtered_apps_only`.
//!
//! Failover follows the same rule, with the route's own (lost) worker among
//! the registered ones: a dedicated route moves only to another worker it
//! matches.

use std::collections::{BTreeMap, HashMap};

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use super::route::RouteSpec;
use super::worker::Worker;

/// One filter of a worker: routes whose property `key` is `value`.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub struct AppFilter {
    /// `session.<field>` or `endpoint.<field>`, e.g. `session.domain_name`.
    pub key: String,
    pub value: String,
}

/// A stored worker's filters: entries that are not a `{key, value}` pair of
/// strings (registrations older than the check) are left out rather than
/// making the worker unreadable.
pub fn lenient_filters<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<AppFilter>, D::Error> {
    let values = Vec::<serde_json::Value>::deserialize(d)?;
    Ok(values
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect())
}

/// A route's properties from `(name, value)` pairs; an absent value is no
/// property (upstream would compare with the text `None`).
pub fn properties<'a>(
    pairs: impl IntoIterator<Item = (&'a str, Option<String>)>,
) -> BTreeMap<String, String> {
    pairs
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_owned(), v?)))
        .collect()
}

fn route_properties(spec: &RouteSpec) -> Option<&BTreeMap<String, String>> {
    spec.circuit
        .as_ref()
        .map(|c| &c.properties)
        .filter(|p| !p.is_empty())
}

fn filters(worker: &Worker) -> &[AppFilter] {
    worker
        .backendai
        .as_ref()
        .map_or(&[][..], |b| b.app_filters.as_slice())
}

fn filtered_only(worker: &Worker) -> bool {
    worker
        .backendai
        .as_ref()
        .is_some_and(|b| b.filtered_apps_only)
}

/// Whether one of `worker`'s filters equals one of `spec`'s properties.
pub fn matches(worker: &Worker, spec: &RouteSpec) -> bool {
    let Some(props) = route_properties(spec) else {
        return false;
    };
    filters(worker)
        .iter()
        .any(|f| props.get(&f.key) == Some(&f.value))
}

/// Whether `spec` matches any of `workers` (all registered workers, whatever
/// their state): then it goes only to the workers it matches.
pub fn is_dedicated<'w>(workers: impl IntoIterator<Item = &'w Worker>, spec: &RouteSpec) -> bool {
    route_properties(spec).is_some() && workers.into_iter().any(|w| matches(w, spec))
}

/// Why `worker` may not take `spec` by the app filters (`dedicated` as
/// [`is_dedicated`] says over every registered worker), or `None`.
pub fn refusal(worker: &Worker, spec: &RouteSpec, dedicated: bool) -> Option<String> {
    let why = if dedicated {
        if matches(worker, spec) {
            return None;
        }
        "is not one of the workers whose app filters match this app"
    } else if filtered_only(worker) {
        "takes only apps its app filters match"
    } else {
        return None;
    };
    Some(format!("worker {} {why}", worker.name))
}

/// The filters every worker of a set holds, counted: whether a route is
/// dedicated without walking every worker ([`is_dedicated`] over the set),
/// kept as workers come, change and go.
#[derive(Clone, Debug, Default)]
pub struct Dedications {
    /// key → value → how many workers hold that filter.
    held: HashMap<String, HashMap<String, usize>>,
}

impl Dedications {
    pub fn of<'w>(workers: impl IntoIterator<Item = &'w Worker>) -> Dedications {
        let mut d = Dedications::default();
        for w in workers {
            d.add(w);
        }
        d
    }

    /// Counts `worker`'s filters in.
    pub fn add(&mut self, worker: &Worker) {
        for f in filters(worker) {
            *self
                .held
                .entry(f.key.clone())
                .or_default()
                .entry(f.value.clone())
                .or_default() += 1;
        }
    }

    /// Counts `worker`'s filters out (as it was counted in).
    pub fn remove(&mut self, worker: &Worker) {
        for f in filters(worker) {
            let Some(values) = self.held.get_mut(&f.key) else {
                continue;
            };
            if let Some(n) = values.get_mut(&f.value) {
                *n -= 1;
                if *n == 0 {
                    values.remove(&f.value);
                }
            }
            if values.is_empty() {
                self.held.remove(&f.key);
            }
        }
    }

    /// Whether some worker of the set has a filter `spec` matches.
    pub fn is_dedicated(&self, spec: &RouteSpec) -> bool {
        if self.held.is_empty() {
            return false;
        }
        route_properties(spec).is_some_and(|props| {
            props.iter().any(|(k, v)| {
                self.held
                    .get(k)
                    .is_some_and(|values| values.contains_key(v))
            })
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use chrono::Utc;
    use uuid::Uuid;

    use super::*;
    use crate::domain::failover;
    use crate::domain::placement::{self, PlacementError, Used};
    use crate::domain::placer::{Placer, Step};
    use crate::domain::{
        BackendAiWorker, CircuitInfo, StoredRoute, WorkerRegistration, WorkerStatus,
    };

    /// A Ready port worker with these filters.
    pub(crate) fn worker(name: &str, only: bool, filters: &[(&str, &str)]) -> Worker {
        let mut registration: WorkerRegistration = serde_json::from_value(serde_json::json!({
            "name": name, "api_url": "http://w",
            "frontend": {"mode": "port", "host": "h", "port_range": [1000, 1099]}
        }))
        .unwrap();
        registration.backendai = Some(BackendAiWorker {
            hostname: "h".into(),
            api_port: 10201,
            tls_listen: false,
            tls_advertised: false,
            filtered_apps_only: only,
            app_filters: filters
                .iter()
                .map(|(k, v)| AppFilter {
                    key: (*k).into(),
                    value: (*v).into(),
                })
                .collect(),
            traefik_last_used_marker_path: None,
            nodes: 1,
        });
        let now = Utc::now();
        Worker::from_parts(
            Uuid::now_v7(),
            registration,
            WorkerStatus::Ready,
            now,
            0,
            0,
            0,
            now,
            now,
        )
    }

    /// An interactive circuit with these properties.
    pub(crate) fn circuit(props: &[(&str, &str)]) -> RouteSpec {
        let mut spec: RouteSpec = serde_json::from_value(serde_json::json!({
            "session_id": Uuid::now_v7(), "service": "jupyter",
            "targets": [{"host": "10.0.0.1", "port": 8888}]
        }))
        .unwrap();
        spec.circuit = Some(CircuitInfo {
            properties: properties(props.iter().map(|(k, v)| (*k, Some((*v).to_owned())))),
            ..CircuitInfo::default()
        });
        spec
    }

    #[test]
    fn a_route_matches_a_worker_by_any_one_filter_equal_to_a_property() {
        let w = worker(
            "gpu",
            true,
            &[
                ("session.domain_name", "gpu"),
                ("endpoint.runtime_variant", "vllm"),
            ],
        );
        assert!(matches(&w, &circuit(&[("session.domain_name", "gpu")])));
        assert!(matches(
            &w,
            &circuit(&[
                ("session.domain_name", "cpu"),
                ("endpoint.runtime_variant", "vllm")
            ])
        ));
        // Values compare exactly; a property of another name does not count.
        assert!(!matches(&w, &circuit(&[("session.domain_name", "GPU")])));
        assert!(!matches(&w, &circuit(&[("session.project_id", "gpu")])));
        assert!(!matches(&w, &circuit(&[])));
        let mut native = circuit(&[]);
        native.circuit = None;
        assert!(!matches(&w, &native));
    }

    #[test]
    fn a_dedicated_route_goes_only_to_the_workers_it_matches() {
        let gpu = worker("gpu", true, &[("session.domain_name", "gpu")]);
        let open_filtered = worker("open", false, &[("session.domain_name", "gpu")]);
        let other = worker("other", true, &[("session.domain_name", "nlp")]);
        let plain = worker("plain", false, &[]);
        let all = [&gpu, &open_filtered, &other, &plain];
        let spec = circuit(&[("session.domain_name", "gpu")]);
        assert!(is_dedicated(all, &spec));
        let admitted: Vec<&str> = all
            .iter()
            .filter(|w| refusal(w, &spec, true).is_none())
            .map(|w| w.name.as_str())
            .collect();
        // A matching worker takes it whether or not it takes only its apps.
        assert_eq!(admitted, ["gpu", "open"]);
        assert!(
            refusal(&plain, &spec, true)
                .unwrap()
                .contains("app filters match this app")
        );
    }

    #[test]
    fn any_other_route_avoids_the_workers_that_take_only_their_apps() {
        let gpu = worker("gpu", true, &[("session.domain_name", "gpu")]);
        let open_filtered = worker("open", false, &[("session.domain_name", "gpu")]);
        let plain = worker("plain", false, &[]);
        let all = [&gpu, &open_filtered, &plain];
        for spec in [circuit(&[("session.domain_name", "default")]), circuit(&[])] {
            assert!(!is_dedicated(all, &spec));
            let admitted: Vec<&str> = all
                .iter()
                .filter(|w| refusal(w, &spec, false).is_none())
                .map(|w| w.name.as_str())
                .collect();
            assert_eq!(admitted, ["open", "plain"]);
        }
        assert!(
            refusal(&gpu, &circuit(&[]), false)
                .unwrap()
                .contains("takes only apps its app filters match")
        );
    }

    #[test]
    fn a_lost_matching_worker_still_makes_the_route_dedicated() {
        let mut gpu = worker("gpu", true, &[("session.domain_name", "gpu")]);
        gpu.status = WorkerStatus::Lost;
        let plain = worker("plain", false, &[]);
        let spec = circuit(&[("session.domain_name", "gpu")]);
        assert!(is_dedicated([&gpu, &plain], &spec));
        assert!(refusal(&plain, &spec, true).is_some());
    }

    #[test]
    fn counted_dedications_agree_with_walking_the_workers() {
        let a = worker("a", true, &[("session.domain_name", "gpu")]);
        let b = worker(
            "b",
            false,
            &[("session.domain_name", "gpu"), ("endpoint.id", "e1")],
        );
        let spec_gpu = circuit(&[("session.domain_name", "gpu")]);
        let spec_e1 = circuit(&[("endpoint.id", "e1")]);
        let spec_none = circuit(&[("session.domain_name", "x")]);
        let mut d = Dedications::of([&a, &b]);
        for s in [&spec_gpu, &spec_e1, &spec_none] {
            assert_eq!(d.is_dedicated(s), is_dedicated([&a, &b], s));
        }
        d.remove(&b);
        assert!(d.is_dedicated(&spec_gpu));
        assert!(!d.is_dedicated(&spec_e1));
        d.remove(&a);
        assert!(!d.is_dedicated(&spec_gpu));
        d.add(&b);
        assert!(d.is_dedicated(&spec_e1));
    }

    /// Places `spec`, answering the placer's questions with nothing taken.
    fn place(placer: &mut Placer, spec: &RouteSpec) -> Result<String, PlacementError> {
        loop {
            match placer.place(spec)? {
                Step::Placed(w, _) => return Ok(w.name),
                Step::NeedUsed(id) => placer.know_used(id, Used::default()),
            }
        }
    }

    #[test]
    fn placement_sends_each_route_where_the_app_filters_say() {
        let gpu = worker("gpu", true, &[("session.domain_name", "gpu")]);
        let plain = worker("plain", false, &[]);
        let dedicated = circuit(&[("session.domain_name", "gpu")]);
        let other = circuit(&[("session.domain_name", "default")]);
        // Both empty: by name alone "gpu" would come first.
        let mut placer = Placer::new(vec![gpu.clone(), plain.clone()], HashMap::new());
        for _ in 0..3 {
            assert_eq!(place(&mut placer, &other).unwrap(), "plain");
        }
        assert_eq!(place(&mut placer, &dedicated).unwrap(), "gpu");
        let ranked = placement::rank(placer.workers(), &dedicated).unwrap();
        assert_eq!(ranked.len(), 1);
        assert_eq!(ranked[0].name, "gpu");

        // Its worker lost, a dedicated route waits: no spill onto plain.
        let mut lost = gpu.clone();
        lost.status = WorkerStatus::Lost;
        placer.refresh(&[gpu.id], vec![lost]);
        let Err(PlacementError::NoEligibleWorker(why)) = place(&mut placer, &dedicated) else {
            panic!("a dedicated route placed without its worker");
        };
        assert!(
            why.contains("gpu is Lost") && why.contains("plain is not one of the workers"),
            "{why}"
        );
        // A pin to a worker that is not dedicated to it is refused too.
        let mut pinned = dedicated.clone();
        pinned.worker_id = Some(plain.id);
        assert!(place(&mut placer, &pinned).is_err());

        // Registered again without filters: nothing is dedicated any more,
        // and it takes any route.
        let mut open = gpu.clone();
        open.backendai.as_mut().unwrap().app_filters.clear();
        open.backendai.as_mut().unwrap().filtered_apps_only = false;
        placer.refresh(&[gpu.id], vec![open]);
        assert_eq!(place(&mut placer, &dedicated).unwrap(), "gpu");
        assert_eq!(place(&mut placer, &other).unwrap(), "gpu");
    }

    fn on(worker: &Worker, spec: RouteSpec, port: u16) -> StoredRoute {
        let now = Utc::now();
        StoredRoute {
            id: Uuid::now_v7(),
            spec,
            worker_id: Some(worker.id),
            port: Some(port),
            subdomain: None,
            pending_reason: None,
            revision: 1,
            created_at: now,
            updated_at: now,
        }
    }

    #[test]
    fn failover_moves_a_dedicated_circuit_only_to_a_worker_it_matches() {
        let gpu_filter = [("session.domain_name", "gpu")];
        let mut lost = worker("gpu-a", true, &gpu_filter);
        lost.status = WorkerStatus::Lost;
        let plain = worker("plain", false, &[]);
        let gpu_b = worker("gpu-b", false, &gpu_filter);
        let route = on(&lost, circuit(&gpu_filter), 1005);
        // Every candidate keeps the URL (same host, same range).
        let r = failover::relocation(&route, &lost, &[plain.clone(), gpu_b.clone()]);
        let to: Vec<_> = r.same_url.iter().map(|s| s.worker_id).collect();
        assert_eq!(to, [Some(gpu_b.id)]);
        // No other worker it matches: it stays, though plain could keep its URL.
        let r = failover::relocation(&route, &lost, std::slice::from_ref(&plain));
        assert!(r.same_url.is_empty(), "{r:?}");
        assert!(matches!(r.otherwise, failover::Fallback::Stay(_)));

        // A circuit matching nothing moves to plain, not to a worker that
        // takes only its own apps.
        let mut lost_plain = worker("plain-a", false, &[]);
        lost_plain.status = WorkerStatus::Lost;
        let gpu_only = worker("gpu-c", true, &gpu_filter);
        let route = on(&lost_plain, circuit(&[("session.domain_name", "x")]), 1005);
        let r = failover::relocation(&route, &lost_plain, &[gpu_only, plain.clone()]);
        let to: Vec<_> = r.same_url.iter().map(|s| s.worker_id).collect();
        assert_eq!(to, [Some(plain.id)]);
    }

    #[test]
    fn stored_filters_that_are_not_pairs_of_strings_are_left_out() {
        let w: BackendAiWorker = serde_json::from_value(serde_json::json!({
            "hostname": "h", "api_port": 1, "tls_listen": false, "tls_advertised": false,
            "app_filters": [{"key": "session.id", "value": "x"}, 7, {"key": 1, "value": "y"}]
        }))
        .unwrap();
        assert_eq!(
            w.app_filters,
            [AppFilter {
                key: "session.id".into(),
                value: "x".into()
            }]
        );
    }
}
