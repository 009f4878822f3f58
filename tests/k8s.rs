//! Kubernetes mode against an in-process API server (tests/k8s/fake_apiserver.rs)
//! that the real `kube::Client` talks to over HTTP: the AppProxyRoute mirror,
//! worker-pod health, Lease election and Events, plus `crdgen`.

mod common;
#[path = "k8s/fake_apiserver.rs"]
mod fake_apiserver;

use std::time::Duration;

use appproxy_coordinator::clock::Clock;
use appproxy_coordinator::domain::WorkerStatus;
use appproxy_coordinator::k8s::crd::{AppProxyRoute, FIELD_MANAGER, cr_name};
use appproxy_coordinator::k8s::events::Recorder;
use appproxy_coordinator::k8s::lease::LeaseElector;
use appproxy_coordinator::k8s::mirror::{self, MirrorConfig};
use appproxy_coordinator::k8s::{self, pods};
use appproxy_coordinator::leader::{self, Elector};
use common::{Backend, Counted, PATIENCE, Task, TestApp, manual_clock, route, wait_for};
use fake_apiserver::{Answer, FakeApiServer, Fault};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

const NS: &str = "appproxy";
const CRS: &str = "apis/appproxy.backend.ai/v1alpha1";
const EVENTS: &str = "apis/events.k8s.io/v1";

/// Kubernetes mode for replica `identity` with the default selector and
/// Lease name, renewing every 100 ms, and the fast mirror.
fn fast_settings(identity: &str) -> k8s::Settings {
    let mut settings = k8s::Settings::new(
        NS,
        identity,
        appproxy_coordinator::config::DEFAULT_WORKER_SELECTOR,
        appproxy_coordinator::config::DEFAULT_LEASE_NAME,
    );
    settings.renew_every = Duration::from_millis(100);
    settings.mirror = fast_mirror();
    settings
}

fn fast_mirror() -> MirrorConfig {
    MirrorConfig {
        // Long on purpose: repairs in these tests come from the watch, not the timer.
        repair_interval: Duration::from_secs(600),
        status_interval: Duration::from_millis(100),
        writes_per_second: 500.0,
        burst: 100,
        debounce: Duration::from_millis(20),
        ..MirrorConfig::new(NS)
    }
}

struct Env {
    app: TestApp,
    api: FakeApiServer,
    client: kube::Client,
}

async fn env() -> Env {
    env_on(Clock::system()).await
}

/// The app on `clock`, and an API server.
async fn env_on(clock: Clock) -> Env {
    let app = TestApp::builder(Backend::Sqlite).clock(clock).start().await;
    let api = FakeApiServer::start().await;
    let client = api.client();
    Env { app, api, client }
}

impl Env {
    /// Runs the mirror until the answer is dropped.
    fn start_mirror(&self) -> Task {
        self.start_mirror_with(fast_mirror())
    }

    fn start_mirror_with(&self, config: MirrorConfig) -> Task {
        let (client, hub) = (self.client.clone(), self.app.hub.clone());
        let recorder = Recorder::new(client.clone(), NS, "test-replica");
        Task::spawn(async move {
            mirror::run(client, hub, recorder, config, std::future::pending())
                .await
                .unwrap();
        })
    }

    /// The coordinator's writes to the CR of `id` (spec or status) so far.
    fn writes_to(&self, id: Uuid) -> Vec<fake_apiserver::Logged> {
        let path = format!("/appproxyroutes/{}", cr_name(id));
        self.api
            .log()
            .into_iter()
            .filter(|l| !l.by_test && l.method == "PATCH" && l.path.contains(&path))
            .collect()
    }

    fn cr(&self, id: Uuid) -> Option<Value> {
        self.api.get(CRS, NS, "appproxyroutes", &cr_name(id))
    }

    async fn cr_where(&self, id: Uuid, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, async || self.cr(id).filter(|c| f(c))).await
    }

    fn event_reasons(&self, id: Uuid) -> Vec<String> {
        self.api
            .objects(EVENTS, NS, "events")
            .values()
            .filter(|e| e["regarding"]["name"] == cr_name(id))
            .map(|e| e["reason"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    async fn create_route(&self, service: &str) -> Uuid {
        let a = self.app.create(route(Uuid::new_v4(), service)).await;
        assert_eq!(a.status, 201, "{:?}", a.body);
        a.body["id"].as_str().unwrap().parse().unwrap()
    }

    async fn ack(&self, worker: Uuid, token: &str) {
        let rev = self.app.revision().await;
        let a = self
            .app
            .call(
                Method::POST,
                &format!("/workers/{worker}/heartbeat"),
                Some(token),
                Some(json!({"acked_revision": rev})),
            )
            .await;
        assert!(a.status.is_success(), "{:?}", a.body);
    }
}

#[tokio::test]
async fn a_route_gets_a_cr_whose_status_follows_propagation_and_deletion_removes_it() {
    let e = env().await;
    let (worker, token, _) = e.app.register("worker-1", [20000, 20100]).await;
    let _mirror = e.start_mirror();
    let id = e.create_route("jupyter").await;

    let cr = e
        .cr_where(id, "a Propagating CR", |c| {
            c["status"]["phase"] == "Propagating"
        })
        .await;
    assert_eq!(cr["spec"]["service"], "jupyter");
    assert_eq!(cr["spec"]["routeId"], id.to_string());
    assert_eq!(cr["spec"]["workerId"], worker.to_string());
    assert_eq!(cr["spec"]["frontend"]["url"], "http://proxy.test:20000");
    assert_eq!(
        cr["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "appproxy-coordinator"
    );
    assert_eq!(cr["status"]["worker"], "worker-1");
    assert_eq!(cr["status"]["url"], "http://proxy.test:20000");

    // The worker acknowledges: Active, Propagated, for the current generation.
    e.ack(worker, &token).await;
    let cr = e
        .cr_where(id, "an Active CR", |c| c["status"]["phase"] == "Active")
        .await;
    assert_eq!(cr["status"]["ackedRevision"], cr["status"]["revision"]);
    assert_eq!(
        cr["status"]["observedGeneration"],
        cr["metadata"]["generation"]
    );
    let conditions = cr["status"]["conditions"].as_array().unwrap();
    for (t, want) in [("Ready", "True"), ("Propagated", "True")] {
        let c = conditions.iter().find(|c| c["type"] == t).unwrap();
        assert_eq!(c["status"], want, "{c}");
        // RFC 3339 in whole seconds, as Kubernetes writes condition times.
        let time = c["lastTransitionTime"].as_str().unwrap();
        assert!(
            time.len() == 20 && time.ends_with('Z') && !time.contains('.'),
            "{time}"
        );
    }

    // Every write is a server-side apply under the one field manager.
    let writes: Vec<_> = e
        .api
        .log()
        .into_iter()
        .filter(|l| l.path.contains("/appproxyroutes/") && l.method == "PATCH")
        .collect();
    assert!(writes.iter().any(|l| l.path.ends_with("/status")));
    for w in &writes {
        assert_eq!(w.content_type, "application/apply-patch+yaml", "{w:?}");
        assert!(
            w.query.contains(&format!("fieldManager={FIELD_MANAGER}")),
            "{w:?}"
        );
        assert!(w.query.contains("force=true"), "{w:?}");
    }
    // Every request says who sends it.
    for l in e.api.log() {
        assert_eq!(l.user_agent, k8s::USER_AGENT, "{l:?}");
    }
    assert!(k8s::USER_AGENT.starts_with("appproxy-coordinator/"));
    // A placement event on the CR.
    wait_for("a Placed event", async || {
        e.event_reasons(id).contains(&"Placed".to_owned())
    })
    .await;

    // The route goes: so does its CR.
    let a = e
        .app
        .manager(Method::DELETE, &format!("/routes/{id}"), None)
        .await;
    assert!(a.status.is_success());
    wait_for("the CR to go", async || e.cr(id).is_none()).await;
}

#[tokio::test]
async fn a_stranded_backendai_circuit_s_cr_carries_the_stranded_condition() {
    let e = env().await;
    // A Backend.AI worker (as PUT /api/worker registers one).
    let worker = common::register_backendai_worker(
        &e.app,
        "bai-1",
        json!({"frontend_mode": "port", "port_range": [20000, 20100], "hostname": "proxy.test"}),
    )
    .await
    .id;
    let _mirror = e.start_mirror();
    let a = e
        .app
        .create(json!({
            "app_mode": "inference", "endpoint_id": Uuid::new_v4(), "service": "llm",
            "targets": [], "worker_id": worker, "circuit": {"user_id": Uuid::new_v4()}
        }))
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    let id: Uuid = a.body["id"].as_str().unwrap().parse().unwrap();
    let stranded = |c: &Value| -> Option<Value> {
        c["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Stranded")
            .cloned()
    };
    e.cr_where(id, "a Stranded=False condition", |c| {
        stranded(c).is_some_and(|s| s["status"] == "False" && s["reason"] == "UrlKept")
    })
    .await;

    // Its worker is lost and no other worker serves proxy.test: it stays, and says so.
    e.app
        .store
        .set_worker_status(worker, WorkerStatus::Lost, e.app.clock.now())
        .await
        .unwrap();
    let cr = e
        .cr_where(id, "a Stranded=True condition", |c| {
            stranded(c).is_some_and(|s| s["status"] == "True")
        })
        .await;
    let s = stranded(&cr).unwrap();
    assert_eq!(s["reason"], "UrlWouldChange");
    let message = s["message"].as_str().unwrap();
    assert!(
        message.contains("http://proxy.test:20000") && message.contains("bai-1"),
        "{message}"
    );
    let time = s["lastTransitionTime"].as_str().unwrap();
    assert!(
        time.len() == 20 && time.ends_with('Z') && !time.contains('.'),
        "{time}"
    );
    assert_eq!(cr["status"]["phase"], "FailingOver");
    assert_eq!(cr["status"]["url"], "http://proxy.test:20000");

    // A native route's CR has no such condition.
    e.app
        .register_with(json!({
            "name": "native-1", "api_url": "http://127.0.0.1:10202",
            "frontend": {"mode": "port", "host": "other.test", "port_range": [20000, 20100]}
        }))
        .await;
    let native = e.create_route("jupyter").await;
    let cr = e
        .cr_where(native, "a native CR", |c| c["status"].is_object())
        .await;
    assert!(stranded(&cr).is_none(), "{cr}");
}

#[tokio::test]
async fn a_cr_deleted_by_hand_is_restored_and_a_hand_edit_is_reverted() {
    let e = env().await;
    e.app.register("worker-1", [20000, 20100]).await;
    let _mirror = e.start_mirror();
    let id = e.create_route("jupyter").await;
    let first = e
        .cr_where(id, "the CR", |c| c["status"]["phase"].is_string())
        .await;
    let crs: Api<AppProxyRoute> = Api::namespaced(e.client.clone(), NS);

    crs.delete(&cr_name(id), &DeleteParams::default())
        .await
        .unwrap();
    let restored = e
        .cr_where(id, "the CR back", |c| {
            c["metadata"]["uid"] != first["metadata"]["uid"] && c["status"]["phase"].is_string()
        })
        .await;
    assert_eq!(restored["spec"], first["spec"]);
    wait_for("a Restored event", async || {
        e.event_reasons(id).contains(&"Restored".to_owned())
    })
    .await;

    // kubectl edit: a merge patch by another field manager.
    let edit = json!({"spec": {"targets": [{"host": "evil.example", "port": 1, "weight": 1}], "service": "ssh"}});
    crs.patch(&cr_name(id), &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .unwrap();
    let reverted = e
        .cr_where(id, "the edit reverted", |c| {
            c["spec"] == first["spec"]
                && c["metadata"]["generation"] != restored["metadata"]["generation"]
        })
        .await;
    assert_eq!(reverted["spec"]["targets"][0]["host"], "10.0.1.7");
    // Its status describes the reverted generation.
    e.cr_where(id, "status for the new generation", |c| {
        c["status"]["observedGeneration"] == c["metadata"]["generation"]
    })
    .await;
    wait_for("a DriftRepaired event", async || {
        e.event_reasons(id).contains(&"DriftRepaired".to_owned())
    })
    .await;
}

#[tokio::test]
async fn a_field_added_to_a_spec_by_hand_is_removed_with_one_repair_event() {
    let e = env().await;
    let (worker, token, _) = e.app.register("worker-1", [20000, 20100]).await;
    let _mirror = e.start_mirror();
    let id = e.create_route("jupyter").await;
    let first = e
        .cr_where(id, "the CR", |c| c["status"]["phase"] == "Propagating")
        .await;
    assert!(first["spec"].get("endpointId").is_none());
    // kubectl edit adds a field the route does not have.
    let crs: Api<AppProxyRoute> = Api::namespaced(e.api.actor_client(), NS);
    let edit = json!({"spec": {"endpointId": Uuid::new_v4()}});
    crs.patch(
        &cr_name(id),
        &PatchParams {
            field_manager: Some("kubectl-edit".into()),
            ..PatchParams::default()
        },
        &Patch::Merge(&edit),
    )
    .await
    .unwrap();
    e.cr_where(id, "the added field removed", |c| {
        c["spec"].get("endpointId").is_none()
            && c["metadata"]["generation"] != first["metadata"]["generation"]
    })
    .await;
    // The mirror goes on (the acknowledgement reaches the status), and has
    // reported the one repair it made, once.
    e.ack(worker, &token).await;
    e.cr_where(id, "an Active CR", |c| c["status"]["phase"] == "Active")
        .await;
    let repairs = wait_for("the DriftRepaired event", async || {
        let n = events_per_cr(&e.api, "DriftRepaired")
            .get(&cr_name(id))
            .copied()
            .unwrap_or(0);
        (n > 0).then_some(n)
    })
    .await;
    assert_eq!(repairs, 1);
    assert_eq!(e.cr(id).unwrap()["spec"], first["spec"]);
}

#[tokio::test]
async fn a_managed_by_label_removed_by_hand_is_restored_without_a_deleted_by_hand_event() {
    let e = env().await;
    e.app.register("worker-1", [20000, 20100]).await;
    let _mirror = e.start_mirror();
    let id = e.create_route("jupyter").await;
    let first = e
        .cr_where(id, "the CR", |c| c["status"]["phase"].is_string())
        .await;
    let crs: Api<AppProxyRoute> = Api::namespaced(e.api.actor_client(), NS);
    let unlabel = json!({"metadata": {"labels": {"app.kubernetes.io/managed-by": null}}});
    crs.patch(
        &cr_name(id),
        &PatchParams::default(),
        &Patch::Merge(&unlabel),
    )
    .await
    .unwrap();
    let relabelled = e
        .cr_where(id, "the label back", |c| {
            c["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "appproxy-coordinator"
                && c["metadata"]["resourceVersion"] != first["metadata"]["resourceVersion"]
                && c["metadata"]["labels"].as_object().unwrap().len() == 2
        })
        .await;
    assert_eq!(relabelled["metadata"]["uid"], first["metadata"]["uid"]);
    wait_for("a DriftRepaired event", async || {
        e.event_reasons(id).contains(&"DriftRepaired".to_owned())
    })
    .await;
    assert!(
        !e.event_reasons(id).contains(&"Restored".to_owned()),
        "the CR was never deleted: {:?}",
        e.event_reasons(id)
    );
}

#[tokio::test]
async fn the_first_diff_repairs_what_was_missed_and_leaves_foreign_crs_alone() {
    let e = env().await;
    e.app.register("worker-1", [20000, 20100]).await;
    let id = e.create_route("jupyter").await;
    let crs: Api<AppProxyRoute> = Api::namespaced(e.client.clone(), NS);
    // Left over from a route deleted while the coordinator was down.
    let orphan = Uuid::new_v4();
    let mut stale: AppProxyRoute = serde_json::from_value(json!({
        "apiVersion": "appproxy.backend.ai/v1alpha1", "kind": "AppProxyRoute",
        "metadata": {"name": cr_name(orphan), "labels": {"app.kubernetes.io/managed-by": "appproxy-coordinator"}},
        "spec": {"routeId": orphan, "appMode": "interactive", "service": "old", "protocol": "http"}
    }))
    .unwrap();
    crs.create(&PostParams::default(), &stale).await.unwrap();
    // Somebody else's CR (no managed-by label) is not ours to delete.
    stale.metadata.name = Some("handmade".into());
    stale.metadata.labels = None;
    crs.create(&PostParams::default(), &stale).await.unwrap();

    let _mirror = e.start_mirror();
    e.cr_where(id, "the missing CR", |c| c["status"]["phase"].is_string())
        .await;
    wait_for("the orphan to go", async || e.cr(orphan).is_none()).await;
    assert!(e.api.get(CRS, NS, "appproxyroutes", "handmade").is_some());
}

#[tokio::test]
async fn an_expired_watch_relists_and_converges() {
    let e = env().await;
    e.app.register("worker-1", [20000, 20100]).await;
    let _mirror = e.start_mirror();
    let a = e.create_route("jupyter").await;
    let b = e.create_route("ssh").await;
    e.cr_where(a, "CR a", |c| c["status"]["phase"].is_string())
        .await;
    e.cr_where(b, "CR b", |c| c["status"]["phase"].is_string())
        .await;

    // The history is compacted, and meanwhile CR a vanishes and CR b is edited:
    // no watch event will ever say so. Only a relist can notice.
    e.api.expire_watches(|objects| {
        let crs = objects
            .get_mut(&(CRS.to_owned(), NS.to_owned(), "appproxyroutes".to_owned()))
            .unwrap();
        crs.remove(&cr_name(a));
        crs.get_mut(&cr_name(b)).unwrap()["spec"]["service"] = "tampered".into();
    });
    e.cr_where(a, "CR a restored", |c| c["status"]["phase"].is_string())
        .await;
    e.cr_where(b, "CR b reverted", |c| c["spec"]["service"] == "ssh")
        .await;
    let log = e.api.log();
    assert!(e.api.gone() >= 1, "the resumed watch was not told 410 Gone");
    // The watcher asked for bookmarks, was told 410 Gone (in-stream), and relisted.
    assert!(
        log.iter()
            .any(|l| l.query.contains("allowWatchBookmarks=true"))
    );
    let lists = log
        .iter()
        .filter(|l| {
            l.method == "GET"
                && l.path.ends_with("/appproxyroutes")
                && !l.query.contains("watch=true")
        })
        .count();
    assert!(
        lists >= 2,
        "expected a relist after 410, saw {lists} list(s)"
    );
}

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

#[tokio::test]
async fn one_lease_holder_and_a_takeover_when_it_stops_renewing() {
    let api = FakeApiServer::start().await;
    let leases: Api<Lease> = Api::namespaced(api.client(), NS);
    // Both replicas read one manual clock: the Lease expires when the test
    // moves the clock, not when the machine gets round to it.
    let clock = manual_clock();
    let lease = Duration::from_secs(1);
    let elector = |who: &str| LeaseElector::new(leases.clone(), "coord", who, lease, clock.clone());
    let (mut a, mut b) = (elector("a"), elector("b"));

    // Racing for a Lease that does not exist yet: exactly one wins.
    let (ra, rb) = tokio::join!(a.try_acquire(), b.try_acquire());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(ra ^ rb, "a: {ra}, b: {rb}");
    let (holder, waiter) = if ra {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert!(holder.try_acquire().await.unwrap(), "the holder renews");
    assert!(!waiter.try_acquire().await.unwrap());
    let renewed = clock.now();

    // The holder stops renewing. Until the lease duration has passed since its
    // last renewal, the Lease stays its own; from then on the other takes over.
    clock.advance(Duration::from_millis(400));
    assert!(
        !waiter.try_acquire().await.unwrap(),
        "too early to take over"
    );
    clock.set(renewed + lease - Duration::from_millis(1));
    assert!(
        !waiter.try_acquire().await.unwrap(),
        "still too early to take over"
    );
    clock.set(renewed + lease);
    assert!(
        waiter.try_acquire().await.unwrap(),
        "takes over an expired lease"
    );
    assert!(
        !holder.try_acquire().await.unwrap(),
        "the old holder lost it"
    );
    let spec = leases.get("coord").await.unwrap().spec.unwrap();
    assert_eq!(spec.lease_transitions, Some(1));
    assert_eq!(spec.lease_duration_seconds, Some(1));
    assert_eq!(
        spec.renew_time,
        Some(appproxy_coordinator::k8s::lease::micro(clock.now())),
        "renewed at the clock's time"
    );

    // Through leader::spawn: one leader; a graceful stop hands over at once.
    // The clock stands still from here on, so the 30 s Lease never expires:
    // only the release can let d in.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thirty = Duration::from_secs(30);
    let c = LeaseElector::new(leases.clone(), "spawned", "c", thirty, clock.clone());
    let (d, d_tries) = Counted::new(LeaseElector::new(
        leases.clone(),
        "spawned",
        "d",
        thirty,
        clock.clone(),
    ));
    let lc = leader::spawn(c, Duration::from_millis(50), async move {
        let _ = stop_rx.await;
    });
    let mut lc_wait = lc.clone();
    tokio::time::timeout(PATIENCE, lc_wait.acquired())
        .await
        .unwrap();
    let ld = leader::spawn(d, Duration::from_millis(50), std::future::pending());
    wait_for("d tries three times", async || {
        assert!(lc.is_leader() && !ld.is_leader(), "c leads, d does not");
        d_tries.load(std::sync::atomic::Ordering::SeqCst) >= 3
    })
    .await;
    assert!(lc.is_leader() && !ld.is_leader());
    let stopped_at = clock.now();
    stop_tx.send(()).unwrap();
    let mut ld_wait = ld.clone();
    tokio::time::timeout(PATIENCE, ld_wait.acquired())
        .await
        .expect("d takes over the released Lease");
    assert!(!lc.is_leader());
    assert_eq!(
        clock.now(),
        stopped_at,
        "the Lease did not expire: c released it"
    );
    let spec = leases.get("spawned").await.unwrap().spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("d"));
}

#[tokio::test]
async fn a_cr_whose_write_hangs_holds_back_no_other_cr() {
    let e = env().await;
    let (worker, token, _) = e.app.register("worker-1", [20000, 20100]).await;
    let _mirror = e.start_mirror_with(MirrorConfig {
        // Longer than the test waits: only a write that does not wait for
        // the hanging one can succeed.
        call_timeout: Duration::from_secs(600),
        ..fast_mirror()
    });
    let stuck = e.create_route("jupyter").await;
    e.cr_where(stuck, "the first CR", |c| {
        c["status"]["phase"] == "Propagating"
    })
    .await;
    // Every write to the first CR hangs from now on; the acknowledgement
    // makes its status stale.
    e.api.inject(Fault::new(
        "PATCH",
        &format!("/appproxyroutes/{}", cr_name(stuck)),
        Answer::Hang,
    ));
    e.ack(worker, &token).await;
    wait_for("a write to the first CR to hang", async || {
        e.writes_to(stuck).iter().any(|l| l.status == 0)
    })
    .await;
    let other = e.create_route("ssh").await;
    e.cr_where(other, "another CR, written meanwhile", |c| {
        c["status"]["phase"].is_string()
    })
    .await;
}

#[tokio::test]
async fn a_write_that_always_fails_backs_off_per_cr_without_an_event_per_retry() {
    let e = env().await;
    let (worker, token, _) = e.app.register("worker-1", [20000, 20100]).await;
    let retry_min = Duration::from_millis(100);
    let _mirror = e.start_mirror_with(MirrorConfig {
        retry_min,
        retry_max: Duration::from_secs(60),
        ..fast_mirror()
    });
    let id = e.create_route("jupyter").await;
    e.cr_where(id, "the CR", |c| c["status"]["phase"] == "Propagating")
        .await;
    wait_for("the Placed event", async || !e.event_reasons(id).is_empty()).await;
    let events_before = e.event_reasons(id).len();
    // A validating webhook rejects every write to this CR from now on.
    let path = format!("/appproxyroutes/{}", cr_name(id));
    e.api
        .inject(Fault::new("PATCH", &path, Answer::Status(422)));
    let before = e.writes_to(id).len();
    e.ack(worker, &token).await;
    let failed = wait_for("five rejected writes", async || {
        let failed: Vec<_> = e.writes_to(id).into_iter().skip(before).collect();
        (failed.len() >= 5).then_some(failed)
    })
    .await;
    // Retried ever later. A pause runs from a refusal to the next attempt's
    // arrival; a loaded machine only lengthens it, so each is held to a
    // lower bound: the n-th at least half again as long as the (n-1)-th
    // could be, from the 100 ms minimum on.
    let pauses: Vec<Duration> = failed.windows(2).map(|w| w[1].arrived - w[0].at).collect();
    for (n, pause) in pauses.iter().enumerate() {
        let least = retry_min.mul_f64(1.5f64.powi(n as i32));
        assert!(*pause >= least, "no backoff between retries: {pauses:?}");
    }
    // And not one long fixed pause either: the last of four pauses (800 ms
    // on schedule) outlasts the first (100 ms on schedule) twice over, which
    // leaves the first 300 ms of slack.
    assert!(
        *pauses.last().unwrap() >= 2 * pauses[0],
        "no backoff between retries: {pauses:?}"
    );
    assert_eq!(
        e.event_reasons(id).len(),
        events_before,
        "an event per failed write"
    );
    // Once writes go through again, the CR catches up at its next retry.
    e.api.heal();
    e.cr_where(id, "the CR caught up", |c| c["status"]["phase"] == "Active")
        .await;
}

/// Kubernetes mode as `serve` starts it, for the replica `who`.
fn start_replica(e: &Env, who: &str, lease: Duration) -> k8s::Running {
    let mut settings = fast_settings(who);
    settings.lease_duration = lease;
    k8s::start(
        e.api.client_as(who),
        settings,
        e.app.hub.clone(),
        e.app.clock.clone(),
        std::future::pending(),
    )
}

/// The number of events with `reason` per CR.
fn events_per_cr(api: &FakeApiServer, reason: &str) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for e in api.objects(EVENTS, NS, "events").values() {
        if e["reason"] == reason {
            let name = e["regarding"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            *counts.entry(name).or_default() += 1;
        }
    }
    counts
}

#[tokio::test]
async fn a_leader_whose_renewals_fail_stops_leading_before_another_takes_over() {
    let e = env_on(manual_clock()).await;
    e.app.register("worker-1", [20000, 20100]).await;
    let lease = Duration::from_secs(3);
    let a = start_replica(&e, "replica-a", lease);
    let mut a_wait = a.leadership.clone();
    tokio::time::timeout(PATIENCE, a_wait.acquired())
        .await
        .unwrap();
    let b = start_replica(&e, "replica-b", lease);
    let first = e.create_route("jupyter").await;
    wait_for("a Placed event", async || {
        e.event_reasons(first).contains(&"Placed".to_owned())
    })
    .await;

    // Every renewal of replica a answers 503 from now on: kube-client retries
    // them for minutes.
    e.api
        .inject(Fault::new("PUT", "/leases/", Answer::Status(503)).from("replica-a"));
    // B must never lead while A still does.
    let overlap = tokio::spawn({
        let (la, mut lb) = (a.leadership.clone(), b.leadership.clone());
        async move {
            lb.acquired().await;
            la.is_leader()
        }
    });
    // Time passes (the clock moves on well past the Lease's duration) until B
    // has taken over.
    wait_for("replica b to take over", async || {
        if b.leadership.is_leader() {
            return Some(());
        }
        e.app.clock.advance(Duration::from_millis(100));
        None
    })
    .await;
    assert!(
        !overlap.await.unwrap(),
        "replica a still led when replica b took over"
    );
    assert!(!a.leadership.is_leader());

    // A route created now is placed once, by the one leader.
    let second = e.create_route("ssh").await;
    e.cr_where(second, "the new CR", |c| c["status"]["phase"].is_string())
        .await;
    wait_for("a Placed event for the new route", async || {
        e.event_reasons(second).contains(&"Placed".to_owned())
    })
    .await;
    // Let a second mirror (if any) get round to it too.
    for _ in 0..10 {
        e.app.clock.advance(Duration::from_millis(100));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (cr, n) in events_per_cr(&e.api, "Placed") {
        assert_eq!(n, 1, "{cr} was placed {n} times");
    }
}

#[tokio::test]
async fn at_shutdown_the_mirror_stops_writing_before_the_lease_is_released() {
    let e = env().await;
    e.app.register("worker-1", [20000, 20100]).await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let settings = fast_settings("replica-a");
    let running = k8s::start(
        e.client.clone(),
        settings,
        e.app.hub.clone(),
        e.app.clock.clone(),
        async move {
            let _ = stop_rx.await;
        },
    );
    let mut leading = running.leadership.clone();
    tokio::time::timeout(PATIENCE, leading.acquired())
        .await
        .unwrap();
    let first = e.create_route("jupyter").await;
    e.cr_where(first, "the first CR", |c| c["status"]["phase"].is_string())
        .await;

    // The API server takes its time over CR writes: one is under way when
    // the coordinator shuts down.
    e.api.inject(Fault::new(
        "PATCH",
        "/appproxyroutes/",
        Answer::Delay(Duration::from_millis(500)),
    ));
    let second = e.create_route("ssh").await;
    wait_for("a CR write under way", async || e.api.delayed() > 0).await;
    stop_tx.send(()).unwrap();
    running.released(PATIENCE).await;
    // Whatever was sent has taken effect by now.
    wait_for("no request under way", async || e.api.delayed() == 0).await;

    let log = e.api.log();
    let release = log
        .iter()
        .rfind(|l| l.method == "PUT" && l.path.contains("/leases/"))
        .expect("the Lease released");
    for w in log
        .iter()
        .filter(|l| l.path.contains("/appproxyroutes/") && l.method == "PATCH")
    {
        assert!(
            w.at <= release.arrived,
            "a CR write took effect after the Lease was released: {w:?}"
        );
    }
    assert!(
        e.cr(second).is_some(),
        "the write under way was seen through"
    );
}

#[test]
fn crdgen_prints_the_committed_crds() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_appproxy-coordinator"))
        .arg("crdgen")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    for path in [
        "crds/appproxyroute.yaml",
        "charts/appproxy-coordinator/crds/appproxyroute.yaml",
    ] {
        let committed = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
            .unwrap_or_default();
        assert!(
            committed == printed,
            "{path} differs from `appproxy-coordinator crdgen`; regenerate it with \
             `cargo run -- crdgen > {path}`"
        );
    }
}
