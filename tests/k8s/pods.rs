//! Worker pods: readiness drives worker health through the health logic,
//! what Kubernetes says about a pod wins over what its worker says, and a
//! deleted pod makes its routes fail over on the CRs (with every call the
//! coordinator makes granted by the chart's Role).

use std::time::Duration;

use appproxy_coordinator::domain::WorkerStatus;
use appproxy_coordinator::k8s::crd::cr_name;
use appproxy_coordinator::k8s::{self, pods};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::{PATIENCE, Task, TestApp, manual_clock, wait_for};
use crate::{CRS, NS, env, env_on, fast_settings};

fn pod(name: &str, ready: bool) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/component": "appproxy-worker"}},
        "spec": {"containers": [{"name": "worker", "image": "appproxy-worker"}]},
        "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    }))
    .unwrap()
}

async fn set_ready(pods: &Api<Pod>, name: &str, ready: bool) {
    let status = json!({"status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

async fn worker_status(app: &TestApp, id: Uuid, want: WorkerStatus) {
    wait_for(format!("worker {want:?}"), async || {
        app.store.get_worker(id).await.unwrap().status == want
    })
    .await;
}

#[tokio::test]
async fn pod_readiness_drives_worker_health_through_the_health_logic() {
    let e = env().await;
    let pods: Api<Pod> = Api::namespaced(e.client.clone(), NS);
    let p1 = pods
        .create(&PostParams::default(), &pod("worker-0", true))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("worker-1", true))
        .await
        .unwrap();
    // Not selected: not a worker pod, even with a matching name.
    let mut other = pod("unrelated", false);
    other.metadata.labels = None;
    pods.create(&PostParams::default(), &other).await.unwrap();

    let worker_json = |name: &str, pod: Value| {
        json!({"name": name, "api_url": "http://127.0.0.1:10201",
               "frontend": {"mode": "port", "host": "proxy.test", "port_range": [20000, 20100]},
               "pod": pod})
    };
    // One worker reports its pod's uid, the other only its name.
    let (w0, _, _) = e
        .app
        .register_with(worker_json(
            "w0",
            json!({"namespace": NS, "name": "worker-0", "uid": p1.metadata.uid}),
        ))
        .await;
    let (w1, _, _) = e
        .app
        .register_with(worker_json(
            "w1",
            json!({"namespace": NS, "name": "worker-1"}),
        ))
        .await;
    let (client, store, clock) = (e.client.clone(), e.app.store.clone(), e.app.clock.clone());
    let _pods = Task::spawn(async move {
        pods::watch(
            client,
            NS,
            appproxy_coordinator::config::DEFAULT_WORKER_SELECTOR,
            store,
            clock,
        )
        .await
    });

    set_ready(&pods, "worker-0", false).await;
    worker_status(&e.app, w0, WorkerStatus::NotReady).await;
    set_ready(&pods, "worker-1", false).await;
    worker_status(&e.app, w1, WorkerStatus::NotReady).await;
    set_ready(&pods, "worker-0", true).await;
    worker_status(&e.app, w0, WorkerStatus::Ready).await;

    pods.delete("worker-0", &DeleteParams::default())
        .await
        .unwrap();
    worker_status(&e.app, w0, WorkerStatus::Lost).await;
    assert_eq!(
        e.app.store.get_worker(w1).await.unwrap().status,
        WorkerStatus::NotReady
    );
}

#[tokio::test]
async fn what_kubernetes_says_about_a_pod_wins_over_what_its_worker_says() {
    let e = env().await;
    let pods: Api<Pod> = Api::namespaced(e.api.actor_client(), NS);
    let mut uids = Vec::new();
    for name in ["worker-0", "worker-1", "worker-2"] {
        let p = pods
            .create(&PostParams::default(), &pod(name, true))
            .await
            .unwrap();
        uids.push(p.metadata.uid.unwrap());
    }
    let worker_json = |i: usize| {
        json!({"name": format!("w{i}"), "api_url": "http://127.0.0.1:10201",
               "frontend": {"mode": "port", "host": "proxy.test", "port_range": [20000, 20100]},
               "pod": {"namespace": NS, "name": format!("worker-{i}"), "uid": uids[i]}})
    };
    let (w0, t0, _) = e.app.register_with(worker_json(0)).await;
    let (w1, t1, _) = e.app.register_with(worker_json(1)).await;
    let (w2, t2, _) = e.app.register_with(worker_json(2)).await;
    let (client, store, clock) = (e.client.clone(), e.app.store.clone(), e.app.clock.clone());
    let _pods = Task::spawn(async move {
        pods::watch(
            client,
            NS,
            appproxy_coordinator::config::DEFAULT_WORKER_SELECTOR,
            store,
            clock,
        )
        .await
    });
    let store = e.app.store.clone();
    let status = |id| {
        let store = store.clone();
        async move { store.get_worker(id).await.unwrap().status }
    };

    // A deleted pod: its worker is Lost, and its heartbeats do not revive it.
    pods.delete("worker-0", &DeleteParams::default())
        .await
        .unwrap();
    worker_status(&e.app, w0, WorkerStatus::Lost).await;
    e.ack(w0, &t0).await;
    assert_eq!(
        status(w0).await,
        WorkerStatus::Lost,
        "revived by a heartbeat"
    );

    // A terminating pod: the same.
    let terminating = json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}});
    pods.patch(
        "worker-1",
        &PatchParams::default(),
        &Patch::Merge(&terminating),
    )
    .await
    .unwrap();
    worker_status(&e.app, w1, WorkerStatus::Lost).await;
    e.ack(w1, &t1).await;
    assert_eq!(
        status(w1).await,
        WorkerStatus::Lost,
        "revived by a heartbeat"
    );

    // A pod not ready: its worker re-registering (or heartbeating) stays NotReady.
    set_ready(&pods, "worker-2", false).await;
    worker_status(&e.app, w2, WorkerStatus::NotReady).await;
    let (again, t2b, body) = e.app.register_with(worker_json(2)).await;
    assert_eq!(again, w2);
    assert_eq!(body["worker"]["status"], "NotReady", "{body}");
    assert_eq!(status(w2).await, WorkerStatus::NotReady);
    e.ack(w2, &t2b).await;
    assert_eq!(status(w2).await, WorkerStatus::NotReady);
    let _ = t2;
    // Once the pod is ready again, so is the worker.
    set_ready(&pods, "worker-2", true).await;
    worker_status(&e.app, w2, WorkerStatus::Ready).await;
}

#[tokio::test]
async fn a_deleted_worker_pod_makes_its_routes_fail_over_on_the_crs() {
    let e = env_on(manual_clock()).await;
    let pods: Api<Pod> = Api::namespaced(e.api.actor_client(), NS);
    let p = pods
        .create(&PostParams::default(), &pod("worker-0", true))
        .await
        .unwrap();
    let (w0, _, _) = e
        .app
        .register_with(json!({"name": "w0", "api_url": "http://127.0.0.1:10201",
            "frontend": {"mode": "port", "host": "proxy.test", "port_range": [20000, 20100]},
            "pod": {"namespace": NS, "name": "worker-0", "uid": p.metadata.uid}}))
        .await;
    let (w1, _, _) = e
        .app
        .register_with(json!({"name": "w1", "api_url": "http://127.0.0.1:10202",
            "frontend": {"mode": "port", "host": "proxy.test", "port_range": [30000, 30100]}}))
        .await;
    let id = e.create_route("jupyter").await;

    // The whole Kubernetes mode, as `serve` starts it: Lease, mirror, pod
    // watcher, and the leader's health loops, all on the app's manual clock.
    let mut settings = fast_settings("replica-a");
    settings.lease_duration = Duration::from_secs(2);
    let running = k8s::start(
        e.client.clone(),
        settings,
        e.app.hub.clone(),
        e.app.clock.clone(),
        std::future::pending(),
    );
    let health = appproxy_coordinator::health::HealthConfig {
        heartbeat_timeout: Duration::from_secs(60),
        failover_grace: Duration::from_millis(300),
        batch_size: 10,
        route_idle_ttl: None,
    };
    let _health = Task::spawn(appproxy_coordinator::health::run(
        e.app
            .hub
            .context(e.app.clock.clone(), running.leadership.clone()),
        health.clone(),
    ));
    let mut leadership = running.leadership.clone();
    tokio::time::timeout(PATIENCE, leadership.acquired())
        .await
        .unwrap();
    e.cr_where(id, "the CR on w0", |c| c["status"]["worker"] == "w0")
        .await;

    pods.delete("worker-0", &DeleteParams::default())
        .await
        .unwrap();
    worker_status(&e.app, w0, WorkerStatus::Lost).await;
    let lost_at = e.app.store.get_worker(w0).await.unwrap().updated_at;
    assert_eq!(lost_at, e.app.clock.now(), "Lost at the clock's time");
    // Within the failover grace, the CR says the route is failing over, and
    // the route stays where it is.
    e.cr_where(id, "a FailingOver CR", |c| {
        c["status"]["phase"] == "FailingOver"
    })
    .await;
    wait_for("a FailingOver event", async || {
        e.event_reasons(id).contains(&"FailingOver".to_owned())
    })
    .await;
    e.app.clock.advance(health.failover_grace);
    appproxy_coordinator::health::pass(&e.app.store, &e.app.metrics, &health, &e.app.clock)
        .await
        .unwrap();
    let route = e.app.store.get_route(id).await.unwrap();
    assert_eq!(route.worker_id, Some(w0), "nothing moves within the grace");

    // Once the grace has passed, the leader's failover loop moves the route;
    // the CR follows it to w1.
    e.app.clock.advance(Duration::from_millis(1));
    e.cr_where(id, "the CR on its new worker", |c| {
        c["status"]["worker"] == "w1" && c["spec"]["workerId"] == json!(w1)
    })
    .await;
    wait_for("a FailedOver event", async || {
        e.event_reasons(id).contains(&"FailedOver".to_owned())
    })
    .await;

    // Route deleted: its CR goes too. With that, this scenario has made every
    // kind of call the coordinator makes to the API server.
    e.app
        .manager(Method::DELETE, &format!("/routes/{id}"), None)
        .await;
    wait_for("the CR of the deleted route is gone", async || {
        e.api.get(CRS, NS, "appproxyroutes", &cr_name(id)).is_none()
    })
    .await;
    assert_eq!(
        e.api.authorizations(),
        chart_role_rules(),
        "the chart's Role must grant exactly what the coordinator calls"
    );
}

/// `(api group, resource, verb)` granted by the chart's Role.
fn chart_role_rules() -> std::collections::BTreeSet<(String, String, String)> {
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/appproxy-coordinator/templates/rbac.yaml"
    ))
    .unwrap();
    // The Role is plain YAML but for template lines; drop those.
    let role: String = template
        .split("\n---")
        .next()
        .unwrap()
        .lines()
        .filter(|l| !l.contains("{{"))
        .map(|l| format!("{l}\n"))
        .collect();
    let role: Value = serde_saphyr::from_str(&role).unwrap();
    assert_eq!(role["kind"], "Role");
    let mut granted = std::collections::BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                for verb in rule["verbs"].as_array().unwrap() {
                    granted.insert((
                        group.as_str().unwrap().to_owned(),
                        resource.as_str().unwrap().to_owned(),
                        verb.as_str().unwrap().to_owned(),
                    ));
                }
            }
        }
    }
    granted
}
