//! Created events waiting for their acknowledgement: when each is
//! published again, and what an acknowledgement moves forward (the route's
//! worker's acknowledged revision, which makes the route `Active`).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::resend::Why;
use super::{Failure, Publisher};
use crate::backendai::bus::{self, Ack, Event};
use crate::domain::{Revision, WorkerStatus};

/// A created event waiting for its acknowledgement.
#[derive(Clone, Copy, Debug)]
pub(super) struct Retry {
    due: DateTime<Utc>,
    /// Re-publishes so far.
    attempts: u32,
}

impl Publisher<'_> {
    /// A created event for `route` was published at `at`: the first
    /// re-publish is due [`BusConfig::first_republish`] after, well inside
    /// the wait of the call that made it (a lost message then costs about a
    /// second).
    ///
    /// [`BusConfig::first_republish`]: crate::backendai::bus::BusConfig::first_republish
    pub(super) fn wait_for_ack(&mut self, route: Uuid, at: DateTime<Utc>) {
        let due = at + self.backoff(0);
        self.retries.insert(route, Retry { due, attempts: 0 });
    }
    /// Publishes again the created events whose acknowledgement is overdue.
    pub(super) async fn republish_due(&mut self) -> Result<(), Failure> {
        let now = self.clock.now();
        let mut due: Vec<Uuid> = self
            .retries
            .iter()
            .filter(|(_, r)| r.due <= now)
            .map(|(id, _)| *id)
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        due.sort();
        self.refresh_workers().await?;
        for id in due {
            let Some(c) = self.circuits.get(&id).filter(|c| !c.acked).cloned() else {
                self.retries.remove(&id);
                continue;
            };
            let retry = self.retries[&id];
            let backoff = self.backoff(retry.attempts + 1);
            // A lost worker hears nothing; try again once it may be back.
            let lost = self
                .workers
                .get(&c.worker_id)
                .is_none_or(|w| w.status == WorkerStatus::Lost);
            if !lost {
                self.send(&Event::created(&c.authority, &c.circuit)).await?;
                self.metrics.backendai_republished.inc();
                self.resent(bus::CREATED, Why::AckWait);
                if retry.attempts == 0 {
                    tracing::warn!(circuit = %id, worker = %c.authority, "Backend.AI bus: no acknowledgement of a created event; publishing it again until there is one");
                } else {
                    tracing::debug!(circuit = %id, worker = %c.authority, attempts = retry.attempts + 1, "Backend.AI bus: created event published again");
                }
            }
            self.retries.insert(
                id,
                Retry {
                    due: now + backoff,
                    attempts: if lost {
                        retry.attempts
                    } else {
                        retry.attempts + 1
                    },
                },
            );
        }
        Ok(())
    }

    /// The wait after the `attempt`-th re-publish (0: after the first
    /// publish): [`BusConfig::first_republish`] doubled each time, at most
    /// [`BusConfig::max_backoff`], less a random part of up to a quarter (so
    /// the re-publishes of many circuits created together spread out).
    ///
    /// [`BusConfig::first_republish`]: crate::backendai::bus::BusConfig::first_republish
    /// [`BusConfig::max_backoff`]: crate::backendai::bus::BusConfig::max_backoff
    pub(super) fn backoff(&self, attempt: u32) -> chrono::Duration {
        let first = self.config.first_republish;
        let wait = first
            .saturating_mul(1 << attempt.min(16))
            .min(self.config.max_backoff.max(first));
        let jittered = wait.mul_f64(rand::random_range(0.75..=1.0));
        chrono::Duration::from_std(jittered).unwrap_or_default()
    }

    /// Records acknowledgements (the circuit as published, on its worker)
    /// in memory; the next pass stores them.
    pub(super) fn acknowledged(&mut self, acks: Vec<Ack>) {
        let mut acked: Vec<(Uuid, Uuid)> = Vec::new();
        for ack in acks {
            let Some(id) = ack.id() else { continue };
            let Some(c) = self.circuits.get(&id) else {
                continue;
            };
            if c.acked || !ack.matches(c) || acked.iter().any(|(a, _)| *a == id) {
                continue;
            }
            acked.push((id, c.worker_id));
        }
        for (id, _) in &acked {
            if let Some(c) = self.circuits.get_mut(id) {
                c.acked = true;
            }
            self.retries.remove(id);
        }
        self.unstored.acked.extend(acked);
    }

    /// Moves each Backend.AI worker's acknowledged revision to just before
    /// its oldest unacknowledged created event, or to the position, with the
    /// pass's write.
    pub(super) fn acked_revisions(&mut self) {
        let mut oldest: HashMap<Uuid, Revision> = HashMap::new();
        for c in self.circuits.values().filter(|c| !c.acked) {
            let o = oldest.entry(c.worker_id).or_insert(c.revision);
            *o = (*o).min(c.revision);
        }
        let workers: Vec<(Uuid, Revision)> = self
            .workers
            .values()
            .filter(|w| w.backendai.is_some())
            .map(|w| (w.id, w.acked_revision))
            .collect();
        self.unstored.acked_revisions.clear();
        for (id, stored) in workers {
            let target = oldest.get(&id).map_or(self.position, |r| r - 1);
            let last = self.acked.get(&id).copied().unwrap_or(stored);
            if target > last {
                self.unstored.acked_revisions.push((id, target));
            }
        }
    }
}
