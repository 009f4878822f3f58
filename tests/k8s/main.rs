//! Kubernetes mode against an in-process API server (`fake_apiserver.rs`)
//! that the real `kube::Client` talks to over HTTP, one module per
//! behaviour: the AppProxyRoute mirror, drift repair, writes that hang or
//! fail, worker-pod health, Lease election, shutdown, and `crdgen`.

#[path = "../common/mod.rs"]
mod common;
mod fake_apiserver;

mod crd;
mod drift;
mod lease;
mod mirror;
mod pods;
mod shutdown;
mod writes;

use std::time::Duration;

use appproxy_coordinator::clock::Clock;
use appproxy_coordinator::k8s;
use appproxy_coordinator::k8s::crd::cr_name;
use appproxy_coordinator::k8s::events::Recorder;
use appproxy_coordinator::k8s::mirror::MirrorConfig;
use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

use common::{Backend, Task, TestApp, route, wait_for};
use fake_apiserver::FakeApiServer;

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
            k8s::mirror::run(client, hub, recorder, config, std::future::pending())
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
