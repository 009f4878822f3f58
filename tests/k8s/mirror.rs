//! The mirror: a route gets an AppProxyRoute whose spec follows the route
//! and whose status follows its propagation (phase, conditions, the
//! Stranded condition of a Backend.AI circuit); the CR goes with the route.

use appproxy_coordinator::domain::WorkerStatus;
use appproxy_coordinator::k8s;
use appproxy_coordinator::k8s::crd::FIELD_MANAGER;
use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::wait_for;
use crate::{common, env};

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
