//! Shutdown: the mirror stops writing before the Lease is released.

use std::time::Duration;

use appproxy_coordinator::k8s;

use crate::common::{PATIENCE, wait_for};
use crate::fake_apiserver::{Answer, Fault};
use crate::{env, fast_settings};

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
