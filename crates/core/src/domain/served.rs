//! A stored route as managers and workers see it: its spec, where it sits,
//! and the status that follows from its worker. The one place that puts a
//! route and its worker together.

use super::Revision;
use super::route::{Frontend, Route, RouteStatus, StoredRoute};
use super::types::Protocol;
use super::worker::Worker;

/// The frontend of a route of `protocol` placed on `worker` at `port` or
/// `subdomain`.
pub fn frontend_on(
    worker: &Worker,
    protocol: Protocol,
    port: Option<u16>,
    subdomain: Option<&str>,
) -> Frontend {
    Frontend::on(
        &worker.frontend,
        &worker.url_home(protocol),
        port,
        subdomain,
    )
}

/// The status of a route at `revision` placed on `worker` (if any).
pub fn status(revision: Revision, worker: Option<&Worker>) -> RouteStatus {
    RouteStatus::derive(worker.map(|w| (w.status, w.acked_revision >= revision)))
}

impl StoredRoute {
    /// The route as served, given its worker (looked up by the caller).
    pub fn to_route(&self, worker: Option<&Worker>) -> Route {
        self.clone().into_route(worker)
    }

    /// [`StoredRoute::to_route`], consuming the stored route instead of copying it.
    pub fn into_route(self, worker: Option<&Worker>) -> Route {
        let spec = self.spec;
        let worker = worker.filter(|w| Some(w.id) == self.worker_id);
        let frontend = match worker {
            Some(w) => frontend_on(w, spec.protocol, self.port, self.subdomain.as_deref()),
            None => Frontend::UNASSIGNED,
        };
        Route {
            id: self.id,
            app_mode: spec.app_mode,
            session_id: spec.session_id,
            endpoint_id: spec.endpoint_id,
            service: spec.service,
            protocol: spec.protocol,
            targets: spec.targets,
            frontend,
            worker_id: self.worker_id,
            access: spec.access,
            labels: spec.labels,
            envs: spec.envs,
            args: spec.args,
            health_check: spec.health_check,
            expires_at: spec.expires_at,
            circuit: spec.circuit,
            status: status(self.revision, worker),
            pending_reason: self.pending_reason.filter(|_| self.worker_id.is_none()),
            revision: self.revision,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use uuid::Uuid;

    use super::*;
    use crate::domain::{RouteSpec, WorkerFrontend, WorkerRegistration, WorkerStatus};

    fn worker(status: WorkerStatus, acked: Revision) -> Worker {
        let registration: WorkerRegistration = serde_json::from_value(serde_json::json!({
            "name": "w", "api_url": "http://w",
            "frontend": {"mode": "port", "host": "proxy.example", "port_range": [10000, 10010]}
        }))
        .unwrap();
        let now = Utc::now();
        Worker::from_parts(
            Uuid::now_v7(),
            registration,
            status,
            now,
            acked,
            0,
            1,
            now,
            now,
        )
    }

    fn stored(worker_id: Option<Uuid>, revision: Revision) -> StoredRoute {
        let spec: RouteSpec = serde_json::from_value(serde_json::json!({
            "session_id": Uuid::nil(), "service": "jupyter",
            "targets": [{"host": "10.0.0.1", "port": 8888}]
        }))
        .unwrap();
        let now = Utc::now();
        StoredRoute {
            id: Uuid::now_v7(),
            spec,
            worker_id,
            port: worker_id.map(|_| 10003),
            subdomain: None,
            pending_reason: Some("no worker".into()),
            revision,
            created_at: now,
            updated_at: now,
        }
    }

    #[test]
    fn status_follows_the_worker_and_its_acknowledgement() {
        assert_eq!(status(5, None), RouteStatus::Pending);
        assert_eq!(
            status(5, Some(&worker(WorkerStatus::Ready, 4))),
            RouteStatus::Propagating
        );
        assert_eq!(
            status(5, Some(&worker(WorkerStatus::Ready, 5))),
            RouteStatus::Active
        );
        assert_eq!(
            status(5, Some(&worker(WorkerStatus::NotReady, 9))),
            RouteStatus::Active
        );
        assert_eq!(
            status(5, Some(&worker(WorkerStatus::Lost, 9))),
            RouteStatus::FailingOver
        );
        assert_eq!(
            status(5, Some(&worker(WorkerStatus::Draining, 1))),
            RouteStatus::Propagating
        );
    }

    #[test]
    fn a_placed_route_shows_its_worker_s_url_and_no_pending_reason() {
        let w = worker(WorkerStatus::Ready, 7);
        let route = stored(Some(w.id), 7).into_route(Some(&w));
        assert_eq!(
            route.frontend.url.as_deref(),
            Some("http://proxy.example:10003")
        );
        assert_eq!(route.status, RouteStatus::Active);
        assert_eq!(route.pending_reason, None);
        assert!(matches!(w.frontend, WorkerFrontend::Port { .. }));
    }

    #[test]
    fn a_route_given_another_worker_is_served_unassigned() {
        let other = worker(WorkerStatus::Ready, 7);
        let route = stored(Some(Uuid::now_v7()), 7).into_route(Some(&other));
        assert_eq!(route.frontend, Frontend::UNASSIGNED);
        let pending = stored(None, 3).into_route(None);
        assert_eq!(pending.status, RouteStatus::Pending);
        assert_eq!(pending.pending_reason.as_deref(), Some("no worker"));
    }
}
