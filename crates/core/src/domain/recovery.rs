//! A Backend.AI circuit whose worker cannot serve it: what its circuit body
//! says ([`CircuitState`]), and how the Manager's re-sync gets it served
//! again ([`resync`]).
//!
//! Failover keeps a circuit's URL true: a circuit on a `Lost` worker moves
//! only where its URL stays the same, else it stays (*stranded*, see
//! [`super::failover`]) and waits for its worker. The Backend.AI Manager
//! re-syncing the endpoint (`POST /v2/endpoints/bulk` for a deployment that
//! already has a circuit) is the one moment a URL may change: the Manager
//! stores the URL it is answered. So a re-sync moves a circuit off its
//! `Lost` worker at once (without waiting for the failover grace): to a
//! worker that keeps its URL where one can take it, else anywhere placement
//! would put a new circuit, with a new URL.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::failover::{self, Fallback, Relocation, relocation_spec};
use super::route::{RouteStatus, StoredRoute};
use super::types::WorkerStatus;
use super::worker::Worker;

/// A circuit's state as its circuit body reports it (`status`): `active`
/// when its worker is `Ready` and holds it; any other word means it is not
/// (yet) served as it should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    /// Its worker is `Ready` and has acknowledged it.
    Active,
    /// Its worker is `Ready` and has not acknowledged it yet.
    Propagating,
    /// Its worker is alive but not ready (e.g. its pod is not Ready).
    WorkerNotReady,
    /// Its worker is `Lost`: not served until the worker comes back, it
    /// fails over, or the Manager re-syncs the endpoint.
    WorkerLost,
    /// Its worker is being removed; it is moving away.
    WorkerDraining,
}

impl CircuitState {
    /// The state of a circuit with `status` on a worker with `worker`'s status.
    pub fn of(status: RouteStatus, worker: WorkerStatus) -> CircuitState {
        match worker {
            WorkerStatus::Ready if status == RouteStatus::Active => CircuitState::Active,
            WorkerStatus::Ready => CircuitState::Propagating,
            WorkerStatus::NotReady => CircuitState::WorkerNotReady,
            WorkerStatus::Lost => CircuitState::WorkerLost,
            WorkerStatus::Draining => CircuitState::WorkerDraining,
        }
    }
}

/// Where a re-synced circuit on `from` goes; `None` when it stays where it
/// is: a native route, or a worker that is not `Lost`. Tried first, the
/// workers among `others` that keep its URL ([`Relocation::same_url`], as
/// failover tries them); otherwise it is re-placed as a new circuit would be
/// (never [`Fallback::Stay`]).
pub fn resync(route: &StoredRoute, from: &Worker, others: &[Worker]) -> Option<Relocation> {
    if route.spec.circuit.is_none() || from.status != WorkerStatus::Lost {
        return None;
    }
    let same_url = failover::relocation(route, from, others).same_url;
    Some(Relocation {
        same_url,
        otherwise: Fallback::Replace(Box::new(relocation_spec(
            &route.spec,
            route.subdomain.as_deref(),
        ))),
    })
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use uuid::Uuid;

    use super::*;
    use crate::domain::{RouteSpec, WorkerRegistration};

    fn port_worker(name: &str, status: WorkerStatus, host: &str, range: [u16; 2]) -> Worker {
        let registration: WorkerRegistration = serde_json::from_value(serde_json::json!({
            "name": name, "api_url": "http://w",
            "frontend": {"mode": "port", "host": host, "port_range": range},
            "backendai": {"hostname": host, "api_port": 10201,
                          "tls_listen": false, "tls_advertised": false}
        }))
        .unwrap();
        let now = Utc::now();
        Worker::from_parts(Uuid::now_v7(), registration, status, now, 0, 0, 1, now, now)
    }

    fn on(worker: &Worker, port: u16, circuit: bool) -> StoredRoute {
        let mut spec: RouteSpec = serde_json::from_value(serde_json::json!({
            "app_mode": "inference", "endpoint_id": Uuid::now_v7(), "service": "llm",
            "targets": [], "worker_id": worker.id, "frontend": {"port": port}
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
            port: Some(port),
            subdomain: None,
            pending_reason: None,
            revision: 1,
            created_at: now,
            updated_at: now,
        }
    }

    #[test]
    fn a_circuit_is_active_only_on_a_ready_worker_that_holds_it() {
        use CircuitState as S;
        use RouteStatus as R;
        use WorkerStatus as W;
        assert_eq!(CircuitState::of(R::Active, W::Ready), S::Active);
        assert_eq!(CircuitState::of(R::Propagating, W::Ready), S::Propagating);
        assert_eq!(CircuitState::of(R::Active, W::NotReady), S::WorkerNotReady);
        assert_eq!(CircuitState::of(R::FailingOver, W::Lost), S::WorkerLost);
        assert_eq!(
            CircuitState::of(R::Propagating, W::Draining),
            S::WorkerDraining
        );
        assert_eq!(
            serde_json::to_value(S::WorkerLost).unwrap(),
            serde_json::json!("worker_lost")
        );
    }

    #[test]
    fn a_resync_moves_a_circuit_off_a_lost_worker_even_where_its_url_changes() {
        let lost = port_worker("a", WorkerStatus::Lost, "127.0.0.1", [10200, 10219]);
        let other = port_worker("b", WorkerStatus::Ready, "127.0.0.1", [10300, 10319]);
        let circuit = on(&lost, 10205, true);
        let r = resync(&circuit, &lost, std::slice::from_ref(&other)).expect("it moves");
        assert!(r.same_url.is_empty(), "{r:?}");
        // Re-placed as a new circuit: no pin, no port of the old worker's.
        let Fallback::Replace(spec) = r.otherwise else {
            panic!("{r:?}")
        };
        assert_eq!((spec.worker_id, spec.frontend.port), (None, None));
    }

    #[test]
    fn a_resync_tries_the_workers_that_keep_the_url_first() {
        let lost = port_worker("a", WorkerStatus::Lost, "127.0.0.1", [10200, 10219]);
        let twin = port_worker("a2", WorkerStatus::Ready, "127.0.0.1", [10200, 10219]);
        let circuit = on(&lost, 10205, true);
        let r = resync(&circuit, &lost, std::slice::from_ref(&twin)).expect("it moves");
        assert_eq!(r.same_url.len(), 1);
        assert_eq!(r.same_url[0].worker_id, Some(twin.id));
        assert_eq!(r.same_url[0].frontend.port, Some(10205));
    }

    #[test]
    fn a_resync_leaves_circuits_on_live_workers_and_native_routes_alone() {
        let other = port_worker("b", WorkerStatus::Ready, "127.0.0.1", [10300, 10319]);
        for status in [
            WorkerStatus::Ready,
            WorkerStatus::NotReady,
            WorkerStatus::Draining,
        ] {
            let w = port_worker("a", status, "127.0.0.1", [10200, 10219]);
            let circuit = on(&w, 10205, true);
            assert_eq!(
                resync(&circuit, &w, std::slice::from_ref(&other)),
                None,
                "{status:?}"
            );
        }
        let lost = port_worker("a", WorkerStatus::Lost, "127.0.0.1", [10200, 10219]);
        let native = on(&lost, 10205, false);
        assert_eq!(resync(&native, &lost, &[other]), None);
    }
}
