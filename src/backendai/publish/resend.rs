//! What the publisher sends again without being asked: route-updated and
//! removed events have no acknowledgement, so the coordinator cannot know
//! they arrived (a worker's subscriber is away for about three seconds each
//! time its Redis connection drops, and whatever is published then is lost).
//!
//! - **Follow-ups.** Each such event is sent again at each of
//!   [`BusConfig::resend_after`] after its change (1 s, 3 s and 7 s by
//!   default): a worker whose subscriber was away for up to about seven
//!   seconds still hears it within seconds of subscribing again.
//! - **Anti-entropy sweep.** Once per [`BusConfig::sweep_period`] (5 minutes
//!   by default), spread evenly over the period and at most
//!   [`BusConfig::sweep_rate`] a second, the current state of every live
//!   circuit is sent again as a route-updated event, and every removal of the
//!   last two periods (kept in the database, `bus_removals`, so a new leader
//!   has them) as a removed event. That bounds how long any lost event can
//!   stay lost.
//!
//! Both are harmless to a worker that did hear the first: it replaces a
//! circuit's routes with the same list, and ignores the removal of a slot it
//! does not hold. A removal is never sent again once another circuit holds
//! the same slot (a worker removes by port or subdomain, not by circuit), and
//! nothing is sent to a Lost worker or for a circuit whose created event is
//! still waiting for its acknowledgement (its re-publishes cover it).
//!
//! [`BusConfig::resend_after`]: crate::backendai::bus::BusConfig::resend_after
//! [`BusConfig::sweep_period`]: crate::backendai::bus::BusConfig::sweep_period
//! [`BusConfig::sweep_rate`]: crate::backendai::bus::BusConfig::sweep_rate

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Failure, Publisher};
use crate::backendai::bus::{self, Event};
use crate::domain::WorkerStatus;
use crate::store::{BusCircuit, BusRemoval};
use crate::telemetry::ResentLabels;

/// Why an event was sent again (the `why` label of the metric).
#[derive(Clone, Copy, Debug)]
pub(super) enum Why {
    /// A created event not acknowledged yet.
    AckWait,
    /// A follow-up shortly after the change.
    AfterChange,
    /// The anti-entropy sweep.
    Sweep,
}

impl Why {
    fn as_str(self) -> &'static str {
        match self {
            Why::AckWait => "ack_wait",
            Why::AfterChange => "after_change",
            Why::Sweep => "sweep",
        }
    }
}

/// The next follow-up of one event: when, and which entry of
/// `resend_after` it is.
#[derive(Clone, Copy, Debug)]
pub(super) struct Step {
    changed: DateTime<Utc>,
    next: usize,
}

/// Follow-ups still to send.
#[derive(Debug, Default)]
pub(super) struct FollowUps {
    /// Route-updated events, by route: the route's state *then* is sent.
    updates: Vec<(Uuid, Step)>,
    removals: Vec<(BusRemoval, Step)>,
}

/// One pass of the sweep over everything it sends.
#[derive(Debug)]
pub(super) struct Sweep {
    started: DateTime<Utc>,
    items: Vec<Item>,
    /// Items handled so far.
    done: usize,
    /// When the sweep last sent.
    last: DateTime<Utc>,
}

#[derive(Clone, Debug)]
enum Item {
    Live(Uuid),
    Removed(BusRemoval),
}

/// A worker's slot as a key: its authority, port and subdomain.
fn slot_key(authority: &str, circuit: &serde_json::Value) -> String {
    let (_, port, subdomain) = bus::slot(circuit);
    format!("{authority}\u{0}{port:?}\u{0}{subdomain:?}")
}

impl Publisher<'_> {
    /// Counts an event sent again.
    pub(super) fn resent(&self, event: &'static str, why: Why) {
        self.metrics
            .backendai_resent
            .get_or_create(&ResentLabels {
                event,
                why: why.as_str(),
            })
            .inc();
    }

    /// A route-updated event for `route` was published at `at`.
    pub(super) fn follow_update(&mut self, route: Uuid, at: DateTime<Utc>) {
        let step = Step {
            changed: at,
            next: 0,
        };
        self.follow.updates.retain(|(id, _)| *id != route);
        self.follow.updates.push((route, step));
    }

    /// A removed event was just published.
    pub(super) fn follow_removal(&mut self, removal: BusRemoval) {
        let step = Step {
            changed: removal.removed_at,
            next: 0,
        };
        self.follow.removals.push((removal, step));
    }

    fn due(&self, step: &Step, now: DateTime<Utc>) -> bool {
        self.config
            .resend_after
            .get(step.next)
            .and_then(|after| chrono::Duration::from_std(*after).ok())
            .is_some_and(|after| step.changed + after <= now)
    }

    /// Sends the follow-ups that are due.
    pub(super) async fn follow_up(&mut self) -> Result<(), Failure> {
        let now = self.clock.now();
        let updates: Vec<usize> = (0..self.follow.updates.len())
            .filter(|&i| self.due(&self.follow.updates[i].1, now))
            .collect();
        let removals: Vec<usize> = (0..self.follow.removals.len())
            .filter(|&i| self.due(&self.follow.removals[i].1, now))
            .collect();
        // Nothing changes `follow` while sending: the indices hold.
        for &i in &updates {
            let id = self.follow.updates[i].0;
            if let Some(c) = self.circuits.get(&id).cloned() {
                self.send_again(&c, Why::AfterChange).await?;
            }
            self.follow.updates[i].1.next += 1;
        }
        if !removals.is_empty() {
            let held = self.held_slots();
            for &i in &removals {
                let r = self.follow.removals[i].0.clone();
                self.remove_again(&r, &held, Why::AfterChange).await?;
                self.follow.removals[i].1.next += 1;
            }
        }
        let last = self.config.resend_after.len();
        self.follow.updates.retain(|(_, s)| s.next < last);
        self.follow.removals.retain(|(_, s)| s.next < last);
        Ok(())
    }

    /// The slots live circuits hold (a removal of one of them must not be
    /// sent again).
    fn held_slots(&self) -> HashSet<String> {
        self.circuits
            .values()
            .map(|c| slot_key(&c.authority, &c.circuit))
            .collect()
    }

    fn lost(&self, worker: Uuid) -> bool {
        self.workers
            .get(&worker)
            .is_none_or(|w| w.status == WorkerStatus::Lost)
    }

    /// Sends a live circuit's state again as a route-updated event, unless
    /// its created event still waits for an acknowledgement or its worker is
    /// Lost.
    async fn send_again(&mut self, c: &BusCircuit, why: Why) -> Result<(), Failure> {
        if !c.acked || self.lost(c.worker_id) {
            return Ok(());
        }
        self.send(&Event::route_updated(&c.authority, &c.circuit))
            .await?;
        self.resent(bus::ROUTE_UPDATED, why);
        Ok(())
    }

    /// Sends a removal again, unless another circuit holds its slot now.
    async fn remove_again(
        &mut self,
        r: &BusRemoval,
        held: &HashSet<String>,
        why: Why,
    ) -> Result<(), Failure> {
        if held.contains(&slot_key(&r.authority, &r.circuit)) {
            return Ok(());
        }
        let lost = self
            .workers
            .values()
            .find(|w| w.name == r.authority)
            .is_some_and(|w| w.status == WorkerStatus::Lost);
        if lost {
            return Ok(());
        }
        self.send(&Event::removed(&r.authority, &r.circuit)).await?;
        self.resent(bus::REMOVED, why);
        Ok(())
    }

    /// Sends the share of the sweep that is due by now: a new sweep starts
    /// once the last one is through and a period has passed since it began.
    pub(super) async fn sweep(&mut self) -> Result<(), Failure> {
        let now = self.clock.now();
        let Ok(period) = chrono::Duration::from_std(self.config.sweep_period) else {
            return Ok(());
        };
        if period <= chrono::Duration::zero() {
            return Ok(());
        }
        let finished = self
            .swept
            .as_ref()
            .is_none_or(|s| s.done >= s.items.len() && now >= s.started + period);
        if finished {
            self.swept = Some(self.new_sweep(now, period).await?);
        }
        let Some(s) = self.swept.as_ref() else {
            return Ok(());
        };
        // Evenly over the period, and at most `sweep_rate` a second.
        let elapsed = (now - s.started).num_milliseconds().max(0) as f64;
        let share = elapsed / period.num_milliseconds() as f64;
        let target = ((s.items.len() as f64 * share).ceil() as usize).min(s.items.len());
        let since_last = (now - s.last).num_milliseconds().max(0) as f64 / 1000.0;
        let allowed = ((f64::from(self.config.sweep_rate) * since_last).ceil() as usize).max(1);
        let upto = target.min(s.done + allowed);
        if upto <= s.done {
            return Ok(());
        }
        // The slots held now, built once a pass reaches a removal.
        let mut held = None;
        for i in s.done..upto {
            let item = self.swept.as_ref().expect("a sweep").items[i].clone();
            match item {
                Item::Live(id) => {
                    if let Some(c) = self.circuits.get(&id).cloned() {
                        self.send_again(&c, Why::Sweep).await?;
                    }
                }
                Item::Removed(r) => {
                    let held = held.get_or_insert_with(|| self.held_slots());
                    self.remove_again(&r, held, Why::Sweep).await?;
                }
            }
            let s = self.swept.as_mut().expect("a sweep");
            s.done = i + 1;
            s.last = now;
        }
        Ok(())
    }

    /// A sweep over what is live now and the removals of the last two
    /// periods (read from the database; older ones are deleted there).
    async fn new_sweep(
        &mut self,
        now: DateTime<Utc>,
        period: chrono::Duration,
    ) -> Result<Sweep, Failure> {
        self.refresh_workers().await?;
        let removals = self.store.bus_removals(now - period * 2).await?;
        let mut live: Vec<Uuid> = self.circuits.keys().copied().collect();
        live.sort();
        let items = live
            .into_iter()
            .map(Item::Live)
            .chain(removals.into_iter().map(Item::Removed))
            .collect();
        Ok(Sweep {
            started: now,
            items,
            done: 0,
            last: now,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_key_is_the_worker_and_its_port_or_subdomain() {
        let a = serde_json::json!({"id": "a", "worker": "w", "port": 10205, "subdomain": null});
        let b = serde_json::json!({"id": "b", "worker": "w", "port": 10205, "subdomain": null});
        let c = serde_json::json!({"id": "a", "worker": "w", "port": 10206, "subdomain": null});
        assert_eq!(slot_key("w1", &a), slot_key("w1", &b));
        assert_ne!(slot_key("w1", &a), slot_key("w2", &a));
        assert_ne!(slot_key("w1", &a), slot_key("w1", &c));
    }
}
