//! A CR's writes that hang or fail: they hold back no other CR, and back
//! off per CR without an event per retry.

use std::time::Duration;

use appproxy_coordinator::k8s::crd::cr_name;
use appproxy_coordinator::k8s::mirror::MirrorConfig;

use crate::common::wait_for;
use crate::fake_apiserver::{Answer, Fault};
use crate::{env, fast_mirror};

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
