//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! A small implementation of the client-go protocol: read the Lease; create it
//! if missing; renew it while we hold it; take it over once its holder stopped
//! renewing for longer than `leaseDurationSeconds`. Every write is a create or
//! a replace carrying the `resourceVersion` that was read, so two replicas
//! racing for it cannot both win (the loser gets `409 Conflict`).
//!
//! Renewal and expiry are judged at the time a [`Clock`] shows.
//!
//! A holder counts on the Lease only until its *renew deadline*: two thirds of
//! the lease duration after the time it wrote as `renewTime` (taken before the
//! write was sent). Others may take over only once the whole duration has
//! passed, so a holder whose renewals fail or hang (the client retries 5xx for
//! a long time) has stopped leading a third of the duration before anyone can
//! take over. Every API call is also bounded by a timeout.
//!
//! Why not a crate: kube-lease-manager 0.13 and kubert 0.25 (both built on
//! kube 5) judge expiry and renewal by `SystemTime::now()` /
//! `chrono::Utc::now()` inside the crate. Time here is a parameter (the
//! [`Clock`]): the split-brain test drives two replicas for minutes of Lease
//! time on one manual clock, with renewals failing, and asserts that no two
//! ever lead at once; neither crate can be driven that way, and neither has
//! the holder-side renew deadline above.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::leader::{Elector, Expiry};

/// How long a holder counts on a Lease it renewed at `renewed`: two thirds of
/// `duration` (others wait for all of it).
pub fn renew_deadline(renewed: DateTime<Utc>, duration: Duration) -> DateTime<Utc> {
    renewed + chrono::Duration::from_std(duration * 2 / 3).unwrap_or(chrono::Duration::MAX)
}

/// Bounds one API call.
async fn bounded<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> anyhow::Result<Result<T, kube::Error>> {
    tokio::time::timeout(limit, call)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from the API server within {limit:?}"))
}

/// What to do with the Lease as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// There is none: create it, held by us.
    Create,
    /// We hold it: renew.
    Renew,
    /// Nobody holds it, or its holder stopped renewing: take it over.
    TakeOver,
    /// Someone else holds it and renews it.
    Wait,
}

pub fn micro(t: DateTime<Utc>) -> MicroTime {
    MicroTime(
        k8s_openapi::jiff::Timestamp::from_microsecond(t.timestamp_micros())
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

fn chrono_of(t: &MicroTime) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.0.as_microsecond()).unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// The pure decision, given the Lease's spec (if it exists), who we are and the time.
pub fn decide(spec: Option<&LeaseSpec>, identity: &str, now: DateTime<Utc>) -> Decision {
    let Some(spec) = spec else {
        return Decision::Create;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder == identity {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::TakeOver;
    }
    let duration = chrono::Duration::seconds(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(chrono_of);
    match renewed {
        Some(t) if t + duration > now => Decision::Wait,
        _ => Decision::TakeOver,
    }
}

/// The Lease spec after `decision` (not `Wait`).
pub fn next_spec(
    current: Option<&LeaseSpec>,
    decision: Decision,
    identity: &str,
    duration: Duration,
    now: DateTime<Utc>,
) -> LeaseSpec {
    let seconds = i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let mut spec = current.cloned().unwrap_or_default();
    spec.lease_duration_seconds = Some(seconds);
    spec.renew_time = Some(micro(now));
    match decision {
        Decision::Renew => {
            if spec.acquire_time.is_none() {
                spec.acquire_time = Some(micro(now));
            }
        }
        Decision::Create | Decision::TakeOver | Decision::Wait => {
            let was_held = spec
                .holder_identity
                .as_deref()
                .is_some_and(|h| !h.is_empty());
            spec.holder_identity = Some(identity.to_owned());
            spec.acquire_time = Some(micro(now));
            spec.lease_transitions = Some(match (decision, was_held) {
                (Decision::Create, _) => 0,
                (_, true) => spec.lease_transitions.unwrap_or(0) + 1,
                (_, false) => spec.lease_transitions.unwrap_or(0),
            });
        }
    }
    spec
}

/// A [`leader::Elector`](crate::leader::Elector) on a Lease.
pub struct LeaseElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    clock: Clock,
    released: Arc<Notify>,
    /// Until when the last successful write lets us lead.
    valid_until: Option<DateTime<Utc>>,
}

impl LeaseElector {
    /// `duration` is how long the Lease stays ours without a renewal; renew
    /// well within it (the coordinator renews every third of it). Renew and
    /// acquire times, and whether the holder's Lease has expired, come from `clock`.
    pub fn new(
        api: Api<Lease>,
        name: &str,
        identity: &str,
        duration: Duration,
        clock: Clock,
    ) -> LeaseElector {
        LeaseElector {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
            clock,
            released: Arc::new(Notify::new()),
            valid_until: None,
        }
    }

    /// Notified once the elector has released the Lease at shutdown.
    pub fn released(&self) -> Arc<Notify> {
        self.released.clone()
    }

    /// How long one API call may take.
    fn call_timeout(&self) -> Duration {
        (self.duration / 3).max(Duration::from_millis(100))
    }

    async fn attempt(&mut self) -> anyhow::Result<bool> {
        let now = self.clock.now();
        let limit = self.call_timeout();
        let current = bounded(limit, self.api.get_opt(&self.name)).await??;
        let decision = decide(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            now,
        );
        let spec = match decision {
            Decision::Wait => return Ok(false),
            d => next_spec(
                current.as_ref().and_then(|l| l.spec.as_ref()),
                d,
                &self.identity,
                self.duration,
                now,
            ),
        };
        let written = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                bounded(limit, self.api.create(&PostParams::default(), &lease)).await?
            }
            Some(mut lease) => {
                // Keeps metadata.resourceVersion: the replace fails if anyone wrote in between.
                lease.spec = Some(spec);
                bounded(
                    limit,
                    self.api.replace(&self.name, &PostParams::default(), &lease),
                )
                .await?
            }
        };
        match written {
            Ok(_) => {
                let until = renew_deadline(now, self.duration);
                if self.clock.now() >= until {
                    // Written too late to count on: others may take it any moment.
                    tracing::warn!(lease = %self.name, "the lease write came back too late");
                    return Ok(false);
                }
                self.valid_until = Some(until);
                if decision != Decision::Renew {
                    tracing::info!(lease = %self.name, identity = %self.identity, ?decision, "acquired the lease");
                }
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

impl Elector for LeaseElector {
    async fn try_acquire(&mut self) -> anyhow::Result<bool> {
        self.attempt().await
    }

    fn expiry(&self) -> Expiry {
        let clock = self.clock.clone();
        match self.valid_until {
            Some(until) => Box::pin(async move { clock.sleep_until(until).await }),
            None => Box::pin(std::future::ready(())),
        }
    }

    async fn release(&mut self) {
        // Hand the Lease back (empty holder) so another replica takes over at once.
        self.valid_until = None;
        let limit = self.call_timeout();
        let result = async {
            let Some(mut lease) = bounded(limit, self.api.get_opt(&self.name)).await?? else {
                return Ok(());
            };
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.renew_time = Some(micro(self.clock.now()));
            bounded(
                limit,
                self.api.replace(&self.name, &PostParams::default(), &lease),
            )
            .await?
            .map(drop)
            .map_err(anyhow::Error::from)
        }
        .await;
        match result {
            Ok(()) => tracing::info!(lease = %self.name, "released the lease"),
            Err(e) => tracing::warn!(lease = %self.name, error = %e, "cannot release the lease"),
        }
        self.released.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(who: &str, renewed: DateTime<Utc>, seconds: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(who.into()),
            lease_duration_seconds: Some(seconds),
            renew_time: Some(micro(renewed)),
            acquire_time: Some(micro(renewed)),
            lease_transitions: Some(2),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn decisions() {
        let now = Utc::now();
        let s = chrono::Duration::seconds;
        assert_eq!(decide(None, "a", now), Decision::Create);
        assert_eq!(
            decide(Some(&held_by("a", now - s(100), 10)), "a", now),
            Decision::Renew
        );
        assert_eq!(
            decide(Some(&held_by("b", now - s(5), 10)), "a", now),
            Decision::Wait
        );
        assert_eq!(
            decide(Some(&held_by("b", now - s(11), 10)), "a", now),
            Decision::TakeOver
        );
        let mut released = held_by("b", now, 10);
        released.holder_identity = None;
        assert_eq!(decide(Some(&released), "a", now), Decision::TakeOver);
    }

    #[test]
    fn takeovers_count_transitions_and_renewals_keep_the_acquire_time() {
        let now = Utc::now();
        let old = held_by("b", now - chrono::Duration::seconds(60), 10);
        let taken = next_spec(
            Some(&old),
            Decision::TakeOver,
            "a",
            Duration::from_secs(15),
            now,
        );
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        assert_eq!(taken.lease_transitions, Some(3));
        assert_eq!(taken.lease_duration_seconds, Some(15));
        assert_eq!(taken.acquire_time, Some(micro(now)));
        let later = now + chrono::Duration::seconds(5);
        let renewed = next_spec(
            Some(&taken),
            Decision::Renew,
            "a",
            Duration::from_secs(15),
            later,
        );
        assert_eq!(renewed.acquire_time, Some(micro(now)));
        assert_eq!(renewed.renew_time, Some(micro(later)));
        assert_eq!(renewed.lease_transitions, Some(3));
        let created = next_spec(None, Decision::Create, "a", Duration::from_secs(15), now);
        assert_eq!(created.lease_transitions, Some(0));
    }
}
