//! Republishing from a snapshot, when the change log was compacted past the
//! publisher's position.

use std::collections::HashMap;

use uuid::Uuid;

use super::{Failure, Publisher};
use crate::backendai::bus::{self, Event, Placed};
use crate::domain::Revision;
use crate::store::{BusCircuit, BusRemoval, BusWrite};

impl Publisher<'_> {
    /// The log no longer reaches back to the position: publish every
    /// Backend.AI route from a snapshot (removals of circuits that are gone
    /// or elsewhere first), and continue from the snapshot's revision.
    pub(super) async fn republish_all(&mut self) -> Result<(), Failure> {
        let (head, routes) = self.store.snapshot(None).await?;
        self.refresh_workers().await?;
        tracing::warn!(
            position = self.position,
            head,
            "Backend.AI bus: the change log was compacted past the last published revision; \
             republishing every circuit"
        );
        let mut now: HashMap<Uuid, Placed> = HashMap::new();
        for route in &routes {
            if let Some(p) = self.placed(route, route.worker_id).await? {
                now.insert(route.id, p);
            }
        }
        let mut events = Vec::new();
        let mut removals = Vec::new();
        for (id, old) in &self.circuits {
            let gone = now.get(id).is_none_or(|n| {
                bus::plan(Some(old), Some(n))
                    .first()
                    .is_some_and(|e| e.name == bus::REMOVED)
            });
            if gone {
                events.push(Event::removed(&old.authority, &old.circuit));
                removals.push(BusRemoval {
                    route_id: *id,
                    revision: head,
                    authority: old.authority.clone(),
                    circuit: old.circuit.clone(),
                    removed_at: self.clock.now(),
                });
            }
        }
        // Whatever was waiting to be stored is replaced: every circuit is
        // written anew, unacknowledged.
        let mut write = BusWrite {
            reset: true,
            removals: removals.clone(),
            ..BusWrite::default()
        };
        let revisions: HashMap<Uuid, Revision> =
            routes.iter().map(|r| (r.id, r.revision)).collect();
        for (id, n) in &now {
            events.push(Event::created(&n.authority, &n.circuit));
            write.put.push(BusCircuit {
                route_id: *id,
                worker_id: n.worker_id,
                authority: n.authority.clone(),
                circuit: n.circuit.clone(),
                revision: revisions[id],
                acked: false,
            });
        }
        let sent_at = self.clock.now();
        for event in &events {
            self.send(event).await?;
        }
        self.unstored = write.clone();
        self.position = head;
        self.store_unstored().await?;
        if !self.stale {
            for r in removals {
                self.follow_removal(r);
            }
            self.circuits = write.put.into_iter().map(|c| (c.route_id, c)).collect();
            self.retries.clear();
            let ids: Vec<Uuid> = self.circuits.keys().copied().collect();
            for id in ids {
                self.wait_for_ack(id, sent_at);
            }
        }
        Ok(())
    }
}
