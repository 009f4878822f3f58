//! Worker pods: their readiness becomes worker health, through
//! [`crate::health::observe`] (the one place the health rules are applied).

use std::collections::HashMap;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use uuid::Uuid;

use crate::clock::Clock;
use crate::domain::Worker;
use crate::domain::health::Observation;
use crate::store::Store;

/// What a pod event says about its worker.
pub fn observation(pod: &Pod, deleted: bool) -> Observation {
    // A terminating pod never comes back (a replacement has a new uid).
    if deleted || pod.metadata.deletion_timestamp.is_some() {
        return Observation::PodDeleted;
    }
    let ready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    if ready {
        Observation::PodReady
    } else {
        Observation::PodNotReady
    }
}

/// The worker running in `pod`: matched by pod uid; by namespace/name only
/// when the worker reported no uid. A worker that reported a different uid is
/// not this pod's (a pod recreated under the same name is another pod).
pub fn worker_of<'a>(workers: impl IntoIterator<Item = &'a Worker>, pod: &Pod) -> Option<Uuid> {
    let uid = pod.metadata.uid.as_deref();
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let mut by_name = None;
    for w in workers {
        let Some(p) = &w.pod else { continue };
        match (&p.uid, uid) {
            (Some(a), Some(b)) if a == b => return Some(w.id),
            (Some(_), Some(_)) => {}
            _ if p.namespace == ns && p.name == name => by_name = by_name.or(Some(w.id)),
            _ => {}
        }
    }
    by_name
}

/// Watches the worker pods matching `selector` in `namespace` and feeds their
/// readiness to the health logic, stamped with `clock`'s time. Runs until the
/// stream ends (never, normally).
pub async fn watch(
    client: kube::Client,
    namespace: &str,
    selector: &str,
    store: Store,
    clock: Clock,
) {
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let config = watcher::Config::default().labels(selector);
    let mut events = watcher(pods, config).default_backoff().boxed();
    // The last observation sent per pod uid, so resyncs do not repeat writes.
    let mut last: HashMap<String, Observation> = HashMap::new();
    loop {
        let event = match events.try_next().await {
            Ok(Some(e)) => e,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "pod watch failed; retrying");
                continue;
            }
        };
        let (pod, deleted) = match event {
            watcher::Event::Apply(p) | watcher::Event::InitApply(p) => (p, false),
            watcher::Event::Delete(p) => (p, true),
            watcher::Event::Init | watcher::Event::InitDone => continue,
        };
        let obs = observation(&pod, deleted);
        let key = pod.metadata.uid.clone().unwrap_or_default();
        if !deleted && last.get(&key) == Some(&obs) {
            continue;
        }
        let workers = match store.list_workers().await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list workers for a pod event");
                continue;
            }
        };
        let Some(worker) = worker_of(&workers, &pod) else {
            tracing::debug!(pod = ?pod.metadata.name, "pod matches no registered worker");
            continue;
        };
        match crate::health::observe(&store, worker, obs, clock.now()).await {
            Ok(_) => {
                if deleted {
                    last.remove(&key);
                } else {
                    last.insert(key, obs);
                }
            }
            Err(e) => tracing::warn!(error = %e, %worker, ?obs, "cannot record a pod observation"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AppMode, PodRef, Protocol, WorkerFrontend, WorkerStatus};
    use chrono::Utc;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};

    fn pod(ns: &str, name: &str, uid: &str, ready: Option<&str>) -> Pod {
        let mut p = Pod::default();
        p.metadata.namespace = Some(ns.into());
        p.metadata.name = Some(name.into());
        p.metadata.uid = Some(uid.into());
        p.status = Some(PodStatus {
            conditions: ready.map(|s| {
                vec![PodCondition {
                    type_: "Ready".into(),
                    status: s.into(),
                    ..PodCondition::default()
                }]
            }),
            ..PodStatus::default()
        });
        p
    }

    fn worker(pod: Option<PodRef>) -> Worker {
        let now = Utc::now();
        Worker {
            id: Uuid::new_v4(),
            name: "w".into(),
            api_url: "http://w".into(),
            frontend: WorkerFrontend::Port {
                host: "h".into(),
                port_range: [1, 2],
            },
            protocols: Protocol::ALL.to_vec(),
            app_modes: AppMode::ALL.to_vec(),
            labels: Default::default(),
            pod,
            capacity: None,
            backendai: None,
            status: WorkerStatus::Ready,
            last_heartbeat: now,
            acked_revision: 0,
            revision_lag: 0,
            route_count: 0,
            created_at: now,
            updated_at: now,
        }
    }

    #[test]
    fn readiness_maps_to_observations() {
        assert_eq!(
            observation(&pod("n", "p", "u", Some("True")), false),
            Observation::PodReady
        );
        assert_eq!(
            observation(&pod("n", "p", "u", Some("False")), false),
            Observation::PodNotReady
        );
        assert_eq!(
            observation(&pod("n", "p", "u", Some("Unknown")), false),
            Observation::PodNotReady
        );
        assert_eq!(
            observation(&pod("n", "p", "u", None), false),
            Observation::PodNotReady
        );
        assert_eq!(
            observation(&pod("n", "p", "u", Some("True")), true),
            Observation::PodDeleted
        );
        let mut terminating = pod("n", "p", "u", Some("True"));
        terminating.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert_eq!(observation(&terminating, false), Observation::PodDeleted);
    }

    #[test]
    fn pods_link_to_workers_by_uid_then_by_name() {
        let r = |uid: Option<&str>| PodRef {
            namespace: "apps".into(),
            name: "worker-0".into(),
            uid: uid.map(str::to_owned),
        };
        let with_uid = worker(Some(r(Some("uid-1"))));
        let without_uid = worker(Some(r(None)));
        let no_pod = worker(None);
        let p = pod("apps", "worker-0", "uid-1", Some("True"));
        // The uid wins over a name match.
        assert_eq!(
            worker_of([&without_uid, &with_uid, &no_pod], &p),
            Some(with_uid.id)
        );
        // No uid match: fall back to namespace/name.
        assert_eq!(worker_of([&without_uid, &no_pod], &p), Some(without_uid.id));
        // A recreated pod (same name, new uid) is not the old worker's.
        let recreated = pod("apps", "worker-0", "uid-2", Some("True"));
        assert_eq!(worker_of([&with_uid], &recreated), None);
        // Other namespaces do not match.
        assert_eq!(
            worker_of([&without_uid], &pod("other", "worker-0", "x", None)),
            None
        );
    }
}
