//! Drift repair: CRs deleted or edited by hand are restored, what was
//! missed while the coordinator was away is repaired at the first diff, and
//! an expired watch relists and converges.

use appproxy_coordinator::k8s::crd::{AppProxyRoute, cr_name};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use uuid::Uuid;

use crate::common::wait_for;
use crate::{CRS, NS, env, events_per_cr};

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

/// The status page lists each repair among its recent events (the mirror
/// tells the replica's read model, `MirrorConfig::repairs`).
#[tokio::test]
async fn repairs_show_among_the_status_pages_recent_events() {
    let e = env().await;
    e.app.register("worker-1", [20000, 20100]).await;
    let board =
        appproxy_coordinator::status::Board::start(&e.app.hub, std::time::Duration::from_secs(5));
    let _mirror = e.start_mirror_with(appproxy_coordinator::k8s::mirror::MirrorConfig {
        repairs: Some(board.clone()),
        ..crate::fast_mirror()
    });
    let id = e.create_route("jupyter").await;
    e.cr_where(id, "the CR", |c| c["status"]["phase"].is_string())
        .await;
    let crs: Api<AppProxyRoute> = Api::namespaced(e.client.clone(), NS);
    crs.delete(&cr_name(id), &DeleteParams::default())
        .await
        .unwrap();
    let told = |kind: &'static str| {
        let board = board.clone();
        async move {
            let state: serde_json::Value =
                serde_json::from_str(&board.state_json().await.unwrap()).unwrap();
            state["recent"].as_array().unwrap().iter().any(|a| {
                a["kind"] == kind
                    && a["route_id"] == json!(id)
                    && a["text"].as_str().unwrap().contains(&cr_name(id))
            })
        }
    };
    wait_for("the restore among the recent events", async || {
        told("restored").await
    })
    .await;
    let edit = json!({"spec": {"service": "ssh"}});
    crs.patch(&cr_name(id), &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .unwrap();
    wait_for("the drift repair among the recent events", async || {
        told("drift-repaired").await
    })
    .await;
}
