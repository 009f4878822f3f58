//! Placement: which worker takes a route, and which port or subdomain it gets.
//!
//! The store asks [`rank`] for the eligible workers in order of preference and
//! tries [`allocate`] on each until one has room; both are pure.

use std::collections::{BTreeSet, HashSet};

use super::app_filter;
use super::route::RouteSpec;
use super::types::{WorkerFrontend, WorkerStatus};
use super::worker::Worker;

/// The frontend a route gets on its worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Assignment {
    Port(u16),
    Subdomain(String),
}

impl Assignment {
    pub fn port(&self) -> Option<u16> {
        match self {
            Assignment::Port(p) => Some(*p),
            Assignment::Subdomain(_) => None,
        }
    }
    pub fn subdomain(&self) -> Option<&str> {
        match self {
            Assignment::Port(_) => None,
            Assignment::Subdomain(s) => Some(s),
        }
    }
}

/// Frontends already taken on one worker.
#[derive(Clone, Debug, Default)]
pub struct Used {
    pub ports: BTreeSet<u16>,
    pub subdomains: HashSet<String>,
    /// `(from, to)`: every port in `from..to` is in `ports`, so the lowest
    /// free port of a range starting in `from..=to` is not below `to`.
    /// Kept by [`Used::take`]; ports are only ever added to a `Used`, so it
    /// stays true. (A worker with thousands of routes then costs a lookup per
    /// placement, not a walk over every port it has.)
    packed: Option<(u16, u32)>,
}

impl Used {
    /// Records `assignment` as taken on a worker whose port range starts at
    /// `low` (for a port; `None` for a wildcard worker).
    pub fn take(&mut self, assignment: &Assignment, low: Option<u16>) {
        match assignment {
            Assignment::Port(port) => {
                self.ports.insert(*port);
                let Some(low) = low else { return };
                let (from, mut to) = match self.packed {
                    Some((from, to)) if from <= low && u32::from(low) <= to => (from, to),
                    _ => (low, u32::from(low)),
                };
                while u16::try_from(to).is_ok_and(|p| self.ports.contains(&p)) {
                    to += 1;
                }
                self.packed = Some((from, to));
            }
            Assignment::Subdomain(subdomain) => {
                self.subdomains.insert(subdomain.clone());
            }
        }
    }

    /// The lowest port of `range` not taken.
    pub fn lowest_free_port(&self, range: [u16; 2]) -> Option<u16> {
        let start = match self.packed {
            Some((from, to)) if from <= range[0] && u32::from(range[0]) <= to => {
                u16::try_from(to).ok()?
            }
            _ => range[0],
        };
        lowest_free_port([start, range[1]], &self.ports)
    }
}

/// Why a route could not be placed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("no eligible worker: {0}")]
    NoEligibleWorker(String),
    #[error("worker {0} does not exist")]
    UnknownWorker(uuid::Uuid),
    #[error("frontend port {0} is already in use")]
    PortTaken(u16),
    /// The route is pinned to a worker that can never serve it as asked
    /// (protocol, mode or frontend), whatever its state: the request is wrong.
    #[error("{0}")]
    PinnedWorkerCannotServe(String),
}

/// Why `worker` cannot take `spec` at all, or `None` when it can.
/// `dedicated`: whether `spec` matches the app filters of some registered
/// worker ([`app_filter::is_dedicated`]), so only those may take it.
pub fn ineligibility(worker: &Worker, spec: &RouteSpec, dedicated: bool) -> Option<String> {
    if let Some(why) = mismatch(worker, spec) {
        return Some(why);
    }
    if let Some(why) = app_filter::refusal(worker, spec, dedicated) {
        return Some(why);
    }
    let why = if worker.status != WorkerStatus::Ready {
        format!("is {}", worker.status.as_str())
    } else if worker.route_count >= worker.max_routes() {
        "is full".to_owned()
    } else {
        return None;
    };
    Some(format!("worker {} {why}", worker.name))
}

/// Why `worker` can never take `spec` (not a matter of its state or load),
/// or `None`.
pub fn mismatch(worker: &Worker, spec: &RouteSpec) -> Option<String> {
    let why = if !worker.protocols.contains(&spec.protocol) {
        format!("does not serve {}", spec.protocol)
    } else if !worker.app_modes.contains(&spec.app_mode) {
        format!("does not take {} routes", spec.app_mode)
    } else if matches!(worker.frontend, WorkerFrontend::Wildcard { .. })
        && !spec.protocol.routable_by_host()
    {
        format!("serves subdomains, which {} cannot use", spec.protocol)
    } else if matches!(worker.frontend, WorkerFrontend::Wildcard { .. })
        && spec.frontend.port.is_some()
    {
        "serves subdomains, not ports".to_owned()
    } else if matches!(worker.frontend, WorkerFrontend::Port { .. })
        && spec.frontend.subdomain.is_some()
    {
        "serves ports, not subdomains".to_owned()
    } else if let (Some(port), WorkerFrontend::Port { port_range, .. }) =
        (spec.frontend.port, &worker.frontend)
        && !(port_range[0]..=port_range[1]).contains(&port)
    {
        format!(
            "serves ports {}-{}, not {port}",
            port_range[0], port_range[1]
        )
    } else {
        return None;
    };
    Some(format!("worker {} {why}", worker.name))
}

/// The workers that may take `spec`, least loaded first (ties by name, so the
/// choice is deterministic). A pinned route considers only its worker.
/// `workers` are every registered worker (the app filters of all of them
/// decide whether `spec` is dedicated).
pub fn rank<'w>(
    workers: &'w [Worker],
    spec: &RouteSpec,
) -> Result<Vec<&'w Worker>, PlacementError> {
    rank_with(workers, spec, app_filter::is_dedicated(workers, spec))
}

/// [`rank`] among some of the workers, `dedicated` as decided over all of
/// them ([`app_filter::is_dedicated`]).
pub fn rank_with<'w>(
    workers: &'w [Worker],
    spec: &RouteSpec,
    dedicated: bool,
) -> Result<Vec<&'w Worker>, PlacementError> {
    let considered: Vec<&Worker> = match spec.worker_id {
        Some(id) => {
            let pinned = workers
                .iter()
                .find(|w| w.id == id)
                .ok_or(PlacementError::UnknownWorker(id))?;
            if let Some(why) = mismatch(pinned, spec) {
                return Err(PlacementError::PinnedWorkerCannotServe(why));
            }
            vec![pinned]
        }
        None => workers.iter().collect(),
    };
    let mut reasons = Vec::new();
    let mut eligible: Vec<&Worker> = considered
        .into_iter()
        .filter(|w| match ineligibility(w, spec, dedicated) {
            None => true,
            Some(why) => {
                reasons.push(why);
                false
            }
        })
        .collect();
    if eligible.is_empty() {
        let detail = if reasons.is_empty() {
            "no workers are registered".to_owned()
        } else {
            reasons.sort();
            let shown = reasons.len().min(5);
            let mut detail = reasons[..shown].join("; ");
            if reasons.len() > shown {
                detail.push_str(&format!("; and {} more", reasons.len() - shown));
            }
            detail
        };
        return Err(PlacementError::NoEligibleWorker(detail));
    }
    // Load as a fraction of capacity, then absolute count, then name.
    eligible.sort_by(|a, b| {
        let load = |w: &Worker| (w.route_count as f64) / (w.max_routes() as f64);
        load(a)
            .total_cmp(&load(b))
            .then(a.route_count.cmp(&b.route_count))
            .then_with(|| a.name.cmp(&b.name))
    });
    Ok(eligible)
}

/// The frontend `spec` gets on `worker`, given what is already taken there.
/// `Err(PortTaken)` when the requested port is in use; `Ok(None)` when full.
pub fn allocate(
    worker: &Worker,
    spec: &RouteSpec,
    used: &Used,
) -> Result<Option<Assignment>, PlacementError> {
    match &worker.frontend {
        WorkerFrontend::Port { port_range, .. } => {
            if let Some(port) = spec.frontend.port {
                return if used.ports.contains(&port) {
                    Err(PlacementError::PortTaken(port))
                } else {
                    Ok(Some(Assignment::Port(port)))
                };
            }
            Ok(used.lowest_free_port(*port_range).map(Assignment::Port))
        }
        WorkerFrontend::Wildcard { .. } => {
            let base = spec
                .frontend
                .subdomain
                .as_deref()
                .and_then(normalize_subdomain)
                .unwrap_or_else(|| default_subdomain(spec));
            Ok(Some(Assignment::Subdomain(free_subdomain(
                &base,
                &used.subdomains,
            ))))
        }
    }
}

/// The lowest port of the inclusive range not in `used`. Walks the used ports
/// in order to the first gap, so a densely packed range costs one pass over
/// what is used instead of a lookup per port.
pub fn lowest_free_port(range: [u16; 2], used: &BTreeSet<u16>) -> Option<u16> {
    let [low, high] = range;
    if low > high {
        return None;
    }
    let mut candidate = low;
    for &port in used.range(low..=high) {
        if port != candidate {
            break;
        }
        candidate = candidate.checked_add(1)?;
    }
    (candidate <= high).then_some(candidate)
}

/// One DNS label from arbitrary text: lowercase, IDNA (punycode) for non-ASCII,
/// anything else turned into '-', at most 63 characters. Where IDNA refuses
/// the text (or maps it onto more than one label), its non-ASCII characters
/// become '-' instead, so text with an ASCII letter or digit always yields a
/// label. `None` when nothing usable is left.
pub fn normalize_subdomain(raw: &str) -> Option<String> {
    let mapped = dashed(raw.trim().chars().flat_map(char::to_lowercase), |c| {
        c.is_alphanumeric()
    });
    let is_label =
        |s: &String| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    let ascii = if mapped.is_ascii() {
        mapped
    } else {
        idna::domain_to_ascii(&mapped)
            .ok()
            .filter(is_label)
            .unwrap_or_else(|| dashed(mapped.chars(), |c| c.is_ascii_alphanumeric()))
    };
    let label = trim_label(&ascii, 63);
    (!label.is_empty()).then(|| label.to_owned())
}

/// `chars` with every run of characters that `keep` refuses turned into one
/// '-', and no '-' at either end.
fn dashed(chars: impl Iterator<Item = char>, keep: impl Fn(char) -> bool) -> String {
    let mut out = String::new();
    for c in chars {
        let c = if keep(c) { c } else { '-' };
        if !(c == '-' && out.ends_with('-')) {
            out.push(c);
        }
    }
    out.trim_matches('-').to_owned()
}

fn trim_label(label: &str, max: usize) -> &str {
    let cut = &label[..label.len().min(max)];
    cut.trim_matches('-')
}

/// `service-xxxxxxxx` from the route's session or endpoint id.
pub fn default_subdomain(spec: &RouteSpec) -> String {
    let id = spec.session_id.or(spec.endpoint_id).unwrap_or_default();
    let short = &id.simple().to_string()[..8];
    normalize_subdomain(&format!("{}-{short}", spec.service)).unwrap_or_else(|| short.to_owned())
}

/// `base`, or `base-2`, `base-3`, … (shortened to stay one label) if taken.
pub fn free_subdomain(base: &str, used: &HashSet<String>) -> String {
    if !used.contains(base) {
        return base.to_owned();
    }
    (2u64..)
        .map(|n| {
            let suffix = format!("-{n}");
            format!("{}{suffix}", trim_label(base, 63 - suffix.len()))
        })
        .find(|candidate| !used.contains(candidate))
        .expect("an unbounded sequence of candidates")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::types::{AppMode, Protocol};
    use crate::domain::worker::WorkerRegistration;
    use chrono::Utc;
    use uuid::Uuid;

    fn worker(name: &str, routes: u64, frontend: WorkerFrontend) -> Worker {
        let reg = WorkerRegistration {
            name: name.into(),
            api_url: "http://127.0.0.1:1".into(),
            frontend,
            protocols: Protocol::ALL.to_vec(),
            app_modes: AppMode::ALL.to_vec(),
            labels: Default::default(),
            pod: None,
            capacity: None,
            backendai: None,
        };
        let now = Utc::now();
        Worker::from_parts(
            Uuid::new_v4(),
            reg,
            WorkerStatus::Ready,
            now,
            0,
            0,
            routes,
            now,
            now,
        )
    }

    fn ports(lo: u16, hi: u16) -> WorkerFrontend {
        WorkerFrontend::Port {
            host: "proxy".into(),
            port_range: [lo, hi],
        }
    }

    fn wildcard() -> WorkerFrontend {
        WorkerFrontend::Wildcard {
            domain: "apps.example.com".into(),
            port: 443,
            tls: true,
        }
    }

    fn spec() -> RouteSpec {
        serde_json::from_value(serde_json::json!({
            "session_id": "3f6c9a52-0d61-4a6d-9b59-2f3d6c0a1e11",
            "service": "jupyter",
            "targets": [{"host": "10.0.1.7", "port": 8888}]
        }))
        .unwrap()
    }

    #[test]
    fn least_loaded_worker_comes_first_and_ties_break_by_name() {
        let ws = vec![
            worker("b", 3, ports(1000, 1099)),
            worker("c", 1, ports(1000, 1099)),
            worker("a", 1, ports(1000, 1099)),
        ];
        let names: Vec<_> = rank(&ws, &spec())
            .unwrap()
            .iter()
            .map(|w| w.name.as_str())
            .collect();
        assert_eq!(names, ["a", "c", "b"]);
    }

    #[test]
    fn load_is_relative_to_capacity() {
        let mut small = worker("small", 5, ports(1000, 1009));
        small.capacity = Some(10);
        let big = worker("big", 50, ports(1000, 1999));
        let ws = vec![small, big];
        assert_eq!(rank(&ws, &spec()).unwrap()[0].name, "big");
    }

    #[test]
    fn ineligible_workers_are_skipped_with_reasons() {
        let mut lost = worker("lost", 0, ports(1000, 1099));
        lost.status = WorkerStatus::Lost;
        let mut not_ready = worker("not-ready", 0, ports(1000, 1099));
        not_ready.status = WorkerStatus::NotReady;
        let mut no_tcp = worker("no-tcp", 0, ports(1000, 1099));
        no_tcp.protocols = vec![Protocol::Http];
        let full = worker("full", 2, ports(1000, 1001));
        let wild = worker("wild", 0, wildcard());
        let ws = vec![lost, not_ready, no_tcp, full, wild];
        let mut s = spec();
        s.protocol = Protocol::Tcp;
        let err = rank(&ws, &s).unwrap_err();
        let PlacementError::NoEligibleWorker(detail) = err else {
            panic!("{err:?}")
        };
        for needle in [
            "lost is Lost",
            "not-ready is NotReady",
            "no-tcp does not serve tcp",
            "full is full",
            "wild serves subdomains",
        ] {
            assert!(detail.contains(needle), "{needle} not in {detail}");
        }
        assert!(matches!(
            rank(&[], &s),
            Err(PlacementError::NoEligibleWorker(d)) if d.contains("no workers")
        ));
    }

    #[test]
    fn pinned_routes_consider_only_their_worker() {
        let ws = vec![
            worker("a", 0, ports(1000, 1099)),
            worker("b", 9, ports(1000, 1099)),
        ];
        let mut s = spec();
        s.worker_id = Some(ws[1].id);
        assert_eq!(rank(&ws, &s).unwrap()[0].name, "b");
        s.worker_id = Some(Uuid::nil());
        assert_eq!(
            rank(&ws, &s).unwrap_err(),
            PlacementError::UnknownWorker(Uuid::nil())
        );
    }

    #[test]
    fn a_pin_to_a_worker_that_can_never_serve_the_route_is_the_requests_fault() {
        let mut http_only = worker("http-only", 0, ports(1000, 1099));
        http_only.protocols = vec![Protocol::Http];
        let mut lost = worker("lost", 0, ports(1000, 1099));
        lost.status = WorkerStatus::Lost;
        let ws = vec![http_only, lost];
        let mut s = spec();
        s.protocol = Protocol::Tcp;
        s.worker_id = Some(ws[0].id);
        assert!(matches!(
            rank(&ws, &s),
            Err(PlacementError::PinnedWorkerCannotServe(d)) if d.contains("does not serve tcp")
        ));
        // A worker that cannot take it *now* is another matter: retry later.
        s.protocol = Protocol::Http;
        s.worker_id = Some(ws[1].id);
        assert!(matches!(
            rank(&ws, &s),
            Err(PlacementError::NoEligibleWorker(d)) if d.contains("is Lost")
        ));
    }

    #[test]
    fn ports_are_the_lowest_free_or_the_requested_one() {
        let w = worker("a", 0, ports(1000, 1003));
        let mut used = Used::default();
        used.ports.extend([1000, 1002]);
        assert_eq!(
            allocate(&w, &spec(), &used).unwrap(),
            Some(Assignment::Port(1001))
        );
        let mut s = spec();
        s.frontend.port = Some(1003);
        assert_eq!(
            allocate(&w, &s, &used).unwrap(),
            Some(Assignment::Port(1003))
        );
        s.frontend.port = Some(1002);
        assert_eq!(
            allocate(&w, &s, &used).unwrap_err(),
            PlacementError::PortTaken(1002)
        );
        used.ports.extend([1001, 1003]);
        assert_eq!(allocate(&w, &spec(), &used).unwrap(), None);
    }

    #[test]
    fn lowest_free_port_finds_the_first_gap() {
        let set = |ports: &[u16]| ports.iter().copied().collect::<BTreeSet<u16>>();
        assert_eq!(lowest_free_port([100, 200], &set(&[])), Some(100));
        assert_eq!(
            lowest_free_port([100, 200], &set(&[100, 101, 102])),
            Some(103)
        );
        assert_eq!(
            lowest_free_port([100, 200], &set(&[100, 102, 103])),
            Some(101)
        );
        // Ports outside the range neither count nor block.
        assert_eq!(
            lowest_free_port([100, 200], &set(&[5, 99, 100, 201])),
            Some(101)
        );
        assert_eq!(lowest_free_port([100, 102], &set(&[100, 101, 102])), None);
        let all: BTreeSet<u16> = (65000..=65535).collect();
        assert_eq!(lowest_free_port([65000, 65535], &all), None);
        assert_eq!(lowest_free_port([65535, 65535], &set(&[])), Some(65535));
        assert_eq!(lowest_free_port([200, 100], &set(&[])), None);
        let dense: BTreeSet<u16> = (1..40_000).collect();
        assert_eq!(lowest_free_port([1, 65535], &dense), Some(40_000));
    }

    #[test]
    fn the_packed_prefix_gives_the_same_port_as_a_full_walk() {
        // Requested ports land anywhere (gaps, beyond the end, outside the
        // range), the rest take the lowest free one; the range's start moves
        // once (a worker registered again with another range).
        let mut used = Used::default();
        let mut state = 7u32;
        let mut next = || {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            state >> 16
        };
        for i in 0..3000 {
            let range = if i < 2000 { [100, 2600] } else { [90, 2600] };
            let expected = lowest_free_port(range, &used.ports);
            assert_eq!(used.lowest_free_port(range), expected, "step {i}");
            let port = if next() % 3 == 0 {
                u16::try_from(next() % 2800).unwrap()
            } else {
                match expected {
                    Some(p) => p,
                    None => break,
                }
            };
            used.take(&Assignment::Port(port), Some(range[0]));
        }
        assert!(
            used.ports.len() > 2000,
            "the range filled up: {}",
            used.ports.len()
        );
    }

    #[test]
    fn requested_port_outside_the_range_makes_a_worker_ineligible() {
        let w = worker("a", 0, ports(1000, 1003));
        let mut s = spec();
        s.frontend.port = Some(2000);
        assert!(ineligibility(&w, &s, false).unwrap().contains("not 2000"));
    }

    #[test]
    fn subdomains_are_normalised_to_one_label() {
        assert_eq!(normalize_subdomain("My App_1").as_deref(), Some("my-app-1"));
        assert_eq!(normalize_subdomain("--a..b--").as_deref(), Some("a-b"));
        assert_eq!(normalize_subdomain("café").as_deref(), Some("xn--caf-dma"));
        assert_eq!(normalize_subdomain("!!!"), None);
        // IDNA maps U+2488 onto "1.", two labels: the non-ASCII part goes.
        assert_eq!(normalize_subdomain("a\u{2488}b").as_deref(), Some("a-b"));
        let long = "x".repeat(100);
        assert_eq!(normalize_subdomain(&long).unwrap().len(), 63);
    }

    #[test]
    fn colliding_subdomains_get_a_suffix_and_stay_one_label() {
        let w = worker("w", 0, wildcard());
        let s = spec();
        let base = default_subdomain(&s);
        assert_eq!(base, "jupyter-3f6c9a52");
        let mut used = Used::default();
        assert_eq!(
            allocate(&w, &s, &used).unwrap(),
            Some(Assignment::Subdomain(base.clone()))
        );
        used.subdomains.insert(base.clone());
        used.subdomains.insert(format!("{base}-2"));
        assert_eq!(
            allocate(&w, &s, &used).unwrap(),
            Some(Assignment::Subdomain(format!("{base}-3")))
        );
        let long = "y".repeat(63);
        let taken: HashSet<String> = [long.clone()].into();
        let next = free_subdomain(&long, &taken);
        assert_eq!(next.len(), 63);
        assert!(next.ends_with("-2"));
    }
}
