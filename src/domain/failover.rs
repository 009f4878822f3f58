//! Failover: which workers give up their routes, and how a route is re-placed.
//!
//! A worker `Lost` for longer than the grace period has its routes moved by
//! the same placement rules as new routes ([`crate::domain::placer`]). What
//! changes for a moved route is decided by [`relocation_spec`].

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::route::RouteSpec;
use super::types::WorkerStatus;
use super::worker::Worker;

/// Whether `worker`'s routes move now: it has been `Lost` for longer than
/// `grace` (it became `Lost` at its `updated_at`) and still holds routes.
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
