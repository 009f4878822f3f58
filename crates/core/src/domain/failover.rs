//! Failover: which workers give up their routes, and how a route is re-placed.
//!
//! A worker `Lost` for longer than the grace period has its routes moved by
//! the same placement rules as new routes ([`crate::domain::placer`]). What
//! changes for a moved route is decided by [`relocation_spec`]; where a route
//! may go at all, by [`relocation`].
//!
//! **Backend.AI circuits keep their URL.** A route created through
//! Backend.AI's API (`RouteSpec::circuit` is set) has a URL the Backend.AI
//! Manager stored and nobody would tell it about a new one. Such a route moves
//! only to a worker where that URL stays the same: a wildcard worker with the
//! same domain, traffic port and scheme (it keeps its subdomain), or a port
//! worker with the same hostname and scheme that can take the same port.
//! Where no such worker is ready, a circuit whose worker is `Lost` stays on it
//! (*stranded*, [`Stranded`]) and is served again at the same URL when the
//! worker comes back, as upstream Backend.AI does (it never moves circuits).
//! A circuit whose worker is being removed (`Draining`) has no worker to wait
//! for: it keeps its URL where it can and otherwise moves like any route.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::app_filter;
use super::placement::{self, Used};
use super::route::{Route, RouteSpec, StoredRoute};
use super::types::{Protocol, WorkerFrontend, WorkerStatus};
use super::url::Place;
use super::worker::Worker;

/// Whether `worker`'s routes move now: it has been `Lost` for longer than
/// `grace` (it became `Lost` at its `updated_at`) and still holds routes.
/// (The store asks only about lost workers that hold routes other than
/// stranded circuits, so a worker holding only those is not re-tried.)
pub fn is_due(worker: &Worker, now: DateTime<Utc>, grace: Duration) -> bool {
    let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
    worker.status == WorkerStatus::Lost
        && worker.route_count > 0
        && now.signed_duration_since(worker.updated_at) > grace
}

/// The spec a route is re-placed with when it leaves its worker (failover,
/// draining) or waits as `Pending`: no pin and no fixed port (ports belong to
/// one worker's host); its subdomain stays a preference, so a route keeps its
/// name where the new worker shares the domain.
pub fn relocation_spec(spec: &RouteSpec, current_subdomain: Option<&str>) -> RouteSpec {
    let mut s = spec.clone();
    s.worker_id = None;
    s.frontend.port = None;
    if let Some(sub) = current_subdomain {
        s.frontend.subdomain = Some(sub.to_owned());
    }
    s
}

/// Where a route leaving its worker may go.
#[derive(Clone, Debug, PartialEq)]
pub struct Relocation {
    /// Tried first, in this order (least loaded first): the route pinned to
    /// one worker where its URL stays the same, asking for exactly the port or
    /// subdomain it has now. Only circuits have these. A try counts only if
    /// the frontend is free there ([`frontend_free`]).
    pub same_url: Vec<RouteSpec>,
    /// What happens when none of `same_url` takes it.
    pub otherwise: Fallback,
}

/// What a route does when it cannot keep its URL.
#[derive(Clone, Debug, PartialEq)]
pub enum Fallback {
    /// Re-placed by the usual rules with this spec (a new port or subdomain
    /// where needed), or `Pending` if it fits nowhere.
    Replace(Box<RouteSpec>),
    /// Stays on its lost worker: a circuit whose URL would change anywhere else.
    Stay(Stranded),
}

/// Why a circuit stays on its lost worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stranded {
    /// The URL it keeps (as the Manager stored it, without the trailing `/`).
    pub url: Option<String>,
    /// A sentence for logs, the API and the CR condition.
    pub message: String,
}

impl Stranded {
    /// The CR condition reason and the store's marker.
    pub const REASON: &'static str = "UrlWouldChange";
}

/// Where `route`, on `from`, may go when it leaves: see [`Relocation`].
/// `others` are the candidate workers (not `from`).
pub fn relocation(route: &StoredRoute, from: &Worker, others: &[Worker]) -> Relocation {
    let replace = || {
        Fallback::Replace(Box::new(relocation_spec(
            &route.spec,
            route.subdomain.as_deref(),
        )))
    };
    if route.spec.circuit.is_none() {
        return Relocation {
            same_url: Vec::new(),
            otherwise: replace(),
        };
    }
    let seat = Seat {
        port: route.port,
        subdomain: route.subdomain.as_deref(),
    };
    let Some(exact) = seat.spec(&route.spec, from) else {
        return Relocation {
            same_url: Vec::new(),
            otherwise: replace(),
        };
    };
    let keepers: Vec<Worker> = url_keepers(&exact, from, others.iter())
        .into_iter()
        .cloned()
        .collect();
    // A dedicated circuit moves only to a worker its app filters match.
    let dedicated = app_filter::is_dedicated(others.iter().chain([from]), &exact);
    let same_url = placement::rank_with(&keepers, &exact, dedicated)
        .unwrap_or_default()
        .into_iter()
        .map(|w| {
            let mut pinned = exact.clone();
            pinned.worker_id = Some(w.id);
            pinned
        })
        .collect();
    // Only a worker being removed leaves nothing to wait for.
    let otherwise = if from.status == WorkerStatus::Draining {
        replace()
    } else {
        Fallback::Stay(stranded_because(from, route.spec.protocol, seat))
    };
    Relocation {
        same_url,
        otherwise,
    }
}

/// Whether the frontend `pinned` asks for (exactly, see
/// [`Relocation::same_url`]) is free among `used`.
pub fn frontend_free(pinned: &RouteSpec, used: &Used) -> bool {
    let port_free = pinned
        .frontend
        .port
        .is_none_or(|p| !used.ports.contains(&p));
    let subdomain_free = pinned
        .frontend
        .subdomain
        .as_ref()
        .is_none_or(|s| !used.subdomains.contains(s));
    port_free && subdomain_free
}

/// Whether `assignment` is exactly the frontend `pinned` asked for (so the
/// URL is the same); placement never answers otherwise for a free frontend,
/// and the store checks before it commits a move.
pub fn is_exact(pinned: &RouteSpec, assignment: &placement::Assignment) -> bool {
    assignment.port() == pinned.frontend.port
        && assignment.subdomain() == pinned.frontend.subdomain.as_deref()
}

/// Whether `route` (a circuit) on its `Lost` worker has nowhere among
/// `workers` to go without changing its URL, and so stays where it is; `None`
/// for any other route. What the Kubernetes mirror shows as the `Stranded`
/// condition. (During the grace period every route stays; the leader acts on
/// the same rule once it has passed, see [`relocation`].)
pub fn stranded<'w>(
    route: &Route,
    worker: &Worker,
    workers: impl IntoIterator<Item = &'w Worker>,
) -> Option<Stranded> {
    if route.circuit.is_none() || worker.status != WorkerStatus::Lost {
        return None;
    }
    let seat = Seat {
        port: match worker.frontend {
            WorkerFrontend::Port { .. } => route.frontend.port,
            WorkerFrontend::Wildcard { .. } => None,
        },
        subdomain: route.frontend.subdomain.as_deref(),
    };
    let spec = route_spec(route);
    let exact = seat.spec(&spec, worker)?;
    let others: Vec<&Worker> = workers.into_iter().filter(|w| w.id != worker.id).collect();
    let dedicated = app_filter::is_dedicated(others.iter().copied().chain([worker]), &exact);
    let can_move = url_keepers(&exact, worker, others)
        .into_iter()
        .any(|w| placement::ineligibility(w, &exact, dedicated).is_none());
    (!can_move).then(|| stranded_because(worker, route.protocol, seat))
}

/// The frontend a route has on its worker.
#[derive(Clone, Copy, Debug)]
struct Seat<'a> {
    port: Option<u16>,
    subdomain: Option<&'a str>,
}

impl Seat<'_> {
    /// `spec` asking for exactly this frontend on a worker like `from`;
    /// `None` while the route has no frontend there.
    fn spec(self, spec: &RouteSpec, from: &Worker) -> Option<RouteSpec> {
        let mut exact = spec.clone();
        exact.worker_id = None;
        match from.frontend {
            WorkerFrontend::Port { .. } => {
                exact.frontend.port = Some(self.port?);
                exact.frontend.subdomain = None;
            }
            WorkerFrontend::Wildcard { .. } => {
                exact.frontend.port = None;
                exact.frontend.subdomain = Some(self.subdomain?.to_owned());
            }
        }
        Some(exact)
    }
}

/// The workers of `others` at which `exact` (the route's current frontend)
/// makes the same URL as on `from`: same scheme and, in port mode, the same
/// hostname and a range holding the port; in wildcard mode the same domain
/// and traffic port. Whether they can take it now is for placement to say.
fn url_keepers<'w>(
    exact: &RouteSpec,
    from: &Worker,
    others: impl IntoIterator<Item = &'w Worker>,
) -> Vec<&'w Worker> {
    let home = from.url_home(exact.protocol);
    others
        .into_iter()
        .filter(|w| w.id != from.id && w.url_home(exact.protocol) == home)
        .filter(|w| match (&w.frontend, exact.frontend.port) {
            (WorkerFrontend::Port { port_range, .. }, Some(p)) => {
                (port_range[0]..=port_range[1]).contains(&p)
            }
            _ => true,
        })
        .collect()
}

fn stranded_because(from: &Worker, protocol: Protocol, seat: Seat<'_>) -> Stranded {
    let home = from.url_home(protocol);
    let url = home.url(seat.port, seat.subdomain);
    let elsewhere = match &home.place {
        Place::Host(host) => format!(
            "no other ready worker with hostname {host} can take port {}",
            seat.port.map_or_else(|| "?".to_owned(), |p| p.to_string())
        ),
        Place::Domain { domain, port } => {
            format!("no other ready wildcard worker serves {domain} on port {port}")
        }
    };
    let message = format!(
        "worker {} is lost and {elsewhere}: a move would change the URL {} that the Backend.AI \
         Manager keeps, so the circuit stays on {} until it comes back",
        from.name,
        url.as_deref().unwrap_or("(none)"),
        from.name
    );
    Stranded { url, message }
}

/// The spec fields of `route` placement looks at.
fn route_spec(route: &Route) -> RouteSpec {
    RouteSpec {
        app_mode: route.app_mode,
        session_id: route.session_id,
        endpoint_id: route.endpoint_id,
        service: route.service.clone(),
        protocol: route.protocol,
        targets: Vec::new(),
        frontend: Default::default(),
        worker_id: None,
        access: route.access.clone(),
        labels: route.labels.clone(),
        envs: Default::default(),
        args: None,
        health_check: None,
        expires_at: None,
        circuit: route.circuit.clone(),
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::domain::WorkerRegistration;

    fn worker(status: WorkerStatus, routes: u64, lost_at: DateTime<Utc>) -> Worker {
        let registration: WorkerRegistration = serde_json::from_value(serde_json::json!({
            "name": "w", "api_url": "http://w",
            "frontend": {"mode": "wildcard", "domain": "apps.example"}
        }))
        .unwrap();
        Worker::from_parts(
            Uuid::now_v7(),
            registration,
            status,
            lost_at,
            0,
            0,
            routes,
            lost_at,
            lost_at,
        )
    }

    #[test]
    fn a_lost_worker_fails_over_once_the_grace_period_has_passed() {
        let lost_at = Utc::now();
        let grace = Duration::from_secs(10);
        let w = worker(WorkerStatus::Lost, 3, lost_at);
        assert!(!is_due(&w, lost_at + chrono::Duration::seconds(9), grace));
        assert!(!is_due(&w, lost_at + chrono::Duration::seconds(10), grace));
        assert!(is_due(
            &w,
            lost_at + chrono::Duration::milliseconds(10_001),
            grace
        ));
        assert!(is_due(
            &w,
            lost_at + chrono::Duration::milliseconds(1),
            Duration::ZERO
        ));
    }

    #[test]
    fn only_lost_workers_that_hold_routes_fail_over() {
        let long_ago = Utc::now() - chrono::Duration::hours(1);
        let now = Utc::now();
        for status in [
            WorkerStatus::Ready,
            WorkerStatus::NotReady,
            WorkerStatus::Draining,
        ] {
            assert!(
                !is_due(&worker(status, 3, long_ago), now, Duration::ZERO),
                "{status:?}"
            );
        }
        assert!(!is_due(
            &worker(WorkerStatus::Lost, 0, long_ago),
            now,
            Duration::ZERO
        ));
    }

    fn bai_worker(name: &str, status: WorkerStatus, frontend: serde_json::Value) -> Worker {
        let hostname = frontend
            .get("host")
            .and_then(|h| h.as_str())
            .unwrap_or("proxy.example")
            .to_owned();
        let registration: WorkerRegistration = serde_json::from_value(serde_json::json!({
            "name": name, "api_url": "http://w", "frontend": frontend,
            "backendai": {"hostname": hostname, "api_port": 10201,
                          "tls_listen": false, "tls_advertised": false}
        }))
        .unwrap();
        let now = Utc::now();
        Worker::from_parts(Uuid::now_v7(), registration, status, now, 0, 0, 1, now, now)
    }

    fn wildcard(name: &str, status: WorkerStatus, domain: &str) -> Worker {
        bai_worker(
            name,
            status,
            serde_json::json!({"mode": "wildcard", "domain": domain, "port": 80}),
        )
    }

    fn port_worker(name: &str, status: WorkerStatus, host: &str) -> Worker {
        bai_worker(
            name,
            status,
            serde_json::json!({"mode": "port", "host": host, "port_range": [10200, 10300]}),
        )
    }

    /// A route on `worker` at `port` or `subdomain`; a circuit when `circuit`.
    fn stored(
        worker: &Worker,
        port: Option<u16>,
        subdomain: Option<&str>,
        circuit: bool,
    ) -> StoredRoute {
        let mut spec: RouteSpec = serde_json::from_value(serde_json::json!({
            "app_mode": "inference", "endpoint_id": Uuid::now_v7(), "service": "llm",
            "targets": []
        }))
        .unwrap();
        if circuit {
            spec.circuit = Some(Default::default());
        }
        let now = Utc::now();
        StoredRoute {
            id: Uuid::now_v7(),
            spec,
            worker_id: Some(worker.id),
            port,
            subdomain: subdomain.map(str::to_owned),
            pending_reason: None,
            revision: 1,
            created_at: now,
            updated_at: now,
        }
    }

    fn stays(r: &Relocation) -> &Stranded {
        match &r.otherwise {
            Fallback::Stay(s) => s,
            other => panic!("expected to stay, got {other:?}"),
        }
    }

    #[test]
    fn a_circuit_on_a_lost_wildcard_worker_moves_only_to_the_same_domain_keeping_its_subdomain() {
        let lost = wildcard("a", WorkerStatus::Lost, "apps.example");
        let same = wildcard("b", WorkerStatus::Ready, "apps.example");
        let other = wildcard("c", WorkerStatus::Ready, "other.example");
        let circuit = stored(&lost, None, Some("llm-1a2b"), true);
        let r = relocation(&circuit, &lost, &[other.clone(), same.clone()]);
        assert_eq!(r.same_url.len(), 1, "{r:?}");
        let pinned = &r.same_url[0];
        assert_eq!(pinned.worker_id, Some(same.id));
        assert_eq!(pinned.frontend.subdomain.as_deref(), Some("llm-1a2b"));
        assert_eq!(pinned.frontend.port, None);
        // Where the same domain cannot take it, it stays.
        assert_eq!(
            stays(&r).url.as_deref(),
            Some("http://llm-1a2b.apps.example")
        );

        // Only another domain: it stays, and says why.
        let r = relocation(&circuit, &lost, std::slice::from_ref(&other));
        assert!(r.same_url.is_empty());
        let s = stays(&r);
        assert!(
            s.message.contains("http://llm-1a2b.apps.example")
                && s.message.contains("worker a is lost"),
            "{s:?}"
        );
        // The same domain on another traffic port or scheme is another URL.
        let mut other_port = same.clone();
        other_port.frontend = WorkerFrontend::Wildcard {
            domain: "apps.example".into(),
            port: 8080,
            tls: false,
        };
        let mut tls = same.clone();
        tls.backendai.as_mut().unwrap().tls_advertised = true;
        let r = relocation(&circuit, &lost, &[other_port, tls]);
        assert!(r.same_url.is_empty(), "{r:?}");
        // A worker of the same domain that is not Ready is no place either.
        let mut not_ready = same.clone();
        not_ready.status = WorkerStatus::NotReady;
        assert!(
            relocation(&circuit, &lost, &[not_ready])
                .same_url
                .is_empty()
        );
    }

    #[test]
    fn a_circuit_on_a_lost_port_worker_stays_unless_its_hostname_and_port_are_served_elsewhere() {
        let lost = port_worker("a", WorkerStatus::Lost, "proxy-a.example");
        let elsewhere = port_worker("b", WorkerStatus::Ready, "proxy-b.example");
        let circuit = stored(&lost, Some(10207), None, true);
        let r = relocation(&circuit, &lost, std::slice::from_ref(&elsewhere));
        assert!(r.same_url.is_empty());
        assert_eq!(
            stays(&r).url.as_deref(),
            Some("http://proxy-a.example:10207")
        );
        // A replacement on the same hostname whose range holds the port takes
        // it at that very port.
        let twin = port_worker("a2", WorkerStatus::Ready, "proxy-a.example");
        let r = relocation(&circuit, &lost, &[elsewhere.clone(), twin.clone()]);
        assert_eq!(r.same_url.len(), 1);
        assert_eq!(r.same_url[0].worker_id, Some(twin.id));
        assert_eq!(r.same_url[0].frontend.port, Some(10207));
        let mut narrow = twin;
        narrow.frontend = WorkerFrontend::Port {
            host: "proxy-a.example".into(),
            port_range: [10300, 10400],
        };
        assert!(relocation(&circuit, &lost, &[narrow]).same_url.is_empty());
    }

    #[test]
    fn a_native_route_moves_as_before() {
        let lost = port_worker("a", WorkerStatus::Lost, "proxy-a.example");
        let elsewhere = port_worker("b", WorkerStatus::Ready, "proxy-b.example");
        let native = stored(&lost, Some(10207), None, false);
        let r = relocation(&native, &lost, &[elsewhere]);
        assert!(r.same_url.is_empty());
        assert_eq!(
            r.otherwise,
            Fallback::Replace(Box::new(relocation_spec(&native.spec, None)))
        );
        let lost = wildcard("a", WorkerStatus::Lost, "apps.example");
        let native = stored(&lost, None, Some("llm"), false);
        let r = relocation(&native, &lost, &[]);
        assert_eq!(
            r.otherwise,
            Fallback::Replace(Box::new(relocation_spec(&native.spec, Some("llm"))))
        );
    }

    #[test]
    fn a_circuit_on_a_removed_worker_keeps_its_url_where_it_can_and_else_moves() {
        let draining = wildcard("a", WorkerStatus::Draining, "apps.example");
        let same = wildcard("b", WorkerStatus::Ready, "apps.example");
        let circuit = stored(&draining, None, Some("llm"), true);
        let r = relocation(&circuit, &draining, std::slice::from_ref(&same));
        assert_eq!(r.same_url[0].worker_id, Some(same.id));
        assert_eq!(
            r.otherwise,
            Fallback::Replace(Box::new(relocation_spec(&circuit.spec, Some("llm"))))
        );
    }

    #[test]
    fn an_exact_frontend_is_free_only_if_nobody_has_it() {
        let lost = wildcard("a", WorkerStatus::Lost, "apps.example");
        let same = wildcard("b", WorkerStatus::Ready, "apps.example");
        let r = relocation(&stored(&lost, None, Some("llm"), true), &lost, &[same]);
        let mut used = Used::default();
        assert!(frontend_free(&r.same_url[0], &used));
        used.subdomains.insert("llm".into());
        assert!(!frontend_free(&r.same_url[0], &used));
    }

    #[test]
    fn the_mirror_sees_a_circuit_stranded_while_its_worker_is_lost_and_nowhere_keeps_its_url() {
        let lost = port_worker("a", WorkerStatus::Lost, "proxy-a.example");
        let elsewhere = port_worker("b", WorkerStatus::Ready, "proxy-b.example");
        let as_route = |s: &StoredRoute| Route {
            id: s.id,
            app_mode: s.spec.app_mode,
            session_id: s.spec.session_id,
            endpoint_id: s.spec.endpoint_id,
            service: s.spec.service.clone(),
            protocol: s.spec.protocol,
            targets: Vec::new(),
            frontend: crate::domain::served::frontend_on(&lost, s.spec.protocol, s.port, None),
            worker_id: s.worker_id,
            access: Default::default(),
            labels: Default::default(),
            envs: Default::default(),
            args: None,
            health_check: None,
            expires_at: None,
            circuit: s.spec.circuit.clone(),
            status: crate::domain::RouteStatus::FailingOver,
            pending_reason: None,
            revision: 1,
            created_at: s.created_at,
            updated_at: s.updated_at,
        };
        let circuit = as_route(&stored(&lost, Some(10207), None, true));
        let all = [lost.clone(), elsewhere.clone()];
        let s = stranded(&circuit, &lost, &all).expect("stranded");
        assert_eq!(s.url.as_deref(), Some("http://proxy-a.example:10207"));
        // Native routes are never stranded, nor circuits on a live worker.
        let native = as_route(&stored(&lost, Some(10208), None, false));
        assert_eq!(stranded(&native, &lost, &all), None);
        let mut back = lost.clone();
        back.status = WorkerStatus::Ready;
        assert_eq!(stranded(&circuit, &back, &all), None);
        // A ready twin on the same hostname could take it: not stranded.
        let twin = port_worker("a2", WorkerStatus::Ready, "proxy-a.example");
        assert_eq!(stranded(&circuit, &lost, &[lost.clone(), twin]), None);
    }

    #[test]
    fn a_relocated_route_drops_its_pin_and_port_and_keeps_its_subdomain() {
        let mut spec: RouteSpec = serde_json::from_value(serde_json::json!({
            "session_id": Uuid::nil(), "service": "jupyter",
            "targets": [{"host": "10.0.0.1", "port": 8888}],
            "worker_id": Uuid::now_v7(), "frontend": {"port": 10005}
        }))
        .unwrap();
        let moved = relocation_spec(&spec, None);
        assert_eq!((moved.worker_id, moved.frontend.port), (None, None));
        assert_eq!(moved.frontend.subdomain, None);
        spec.frontend.port = None;
        let moved = relocation_spec(&spec, Some("jupyter-1a2b"));
        assert_eq!(moved.frontend.subdomain.as_deref(), Some("jupyter-1a2b"));
        // Everything else is the route as it was.
        assert_eq!(
            (moved.service.as_str(), &moved.targets),
            (spec.service.as_str(), &spec.targets)
        );
    }
}
