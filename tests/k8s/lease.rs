//! Lease election: one holder and a takeover when it stops renewing, and a
//! leader whose renewals fail stops leading before another takes over.

use std::time::Duration;

use appproxy_coordinator::k8s::lease::LeaseElector;
use appproxy_coordinator::leader::{self, Elector};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;

use crate::common::{Counted, PATIENCE, manual_clock, wait_for};
use crate::fake_apiserver::{Answer, FakeApiServer, Fault};
use crate::{NS, env_on, events_per_cr, start_replica};

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
