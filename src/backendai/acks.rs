//! Waiting for workers' acknowledgements of circuits.
//!
//! Each replica hears every `appproxy_worker_circuit_added_event` on the bus
//! and passes the circuit ids it carries to [`Acks::heard`]. A request that
//! must answer only once the worker holds its circuit subscribes *before* it
//! commits (so an acknowledgement cannot slip by between the commit and the
//! wait) and then waits for its ids.
//!
//! The most recent acknowledgements are also remembered: a Manager retrying
//! a create right after the first answer finds its circuit acknowledged here
//! even before the leader has recorded it (which makes the route `Active`),
//! instead of waiting for a re-publish.
//!
//! A request that creates circuits collects the ones to wait for in an
//! [`Expected`] ([`Acks::expect`]) and waits for them all before it answers.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;
use uuid::Uuid;

use super::Error;
use crate::domain::{Route, RouteStatus, Worker, WorkerStatus};
use crate::store::Store;

/// How many acknowledged circuit ids a replica remembers.
const REMEMBERED: usize = 65_536;

/// The acknowledgements heard on this replica.
#[derive(Clone, Debug)]
pub struct Acks {
    tx: broadcast::Sender<Arc<Vec<Uuid>>>,
    recent: Arc<Mutex<Recent>>,
}

/// The last [`REMEMBERED`] acknowledged circuit ids, oldest first.
#[derive(Debug, Default)]
struct Recent {
    order: VecDeque<Uuid>,
    ids: HashSet<Uuid>,
}

impl Default for Acks {
    fn default() -> Acks {
        Acks {
            tx: broadcast::channel(4096).0,
            recent: Arc::default(),
        }
    }
}

impl Acks {
    /// A worker acknowledged these circuits.
    pub fn heard(&self, circuits: Vec<Uuid>) {
        {
            let mut recent = self.recent.lock().expect("never poisoned");
            for id in &circuits {
                if recent.ids.insert(*id) {
                    recent.order.push_back(*id);
                }
            }
            while recent.order.len() > REMEMBERED {
                if let Some(old) = recent.order.pop_front() {
                    recent.ids.remove(&old);
                }
            }
        }
        let _ = self.tx.send(Arc::new(circuits));
    }

    /// Forgets the remembered acknowledgements of `circuits`: they moved to
    /// another worker, which must acknowledge them anew (an acknowledgement
    /// names the circuit, not where it is).
    pub fn forget(&self, circuits: &[Uuid]) {
        let mut recent = self.recent.lock().expect("never poisoned");
        for id in circuits {
            if recent.ids.remove(id) {
                recent.order.retain(|o| o != id);
            }
        }
    }

    /// Starts listening; call before committing what will be acknowledged.
    pub fn subscribe(&self) -> AckWaiter {
        AckWaiter {
            rx: self.tx.subscribe(),
            recent: self.recent.clone(),
        }
    }
}

/// Acknowledgements heard since [`Acks::subscribe`], and the recent ones.
#[derive(Debug)]
pub struct AckWaiter {
    rx: broadcast::Receiver<Arc<Vec<Uuid>>>,
    recent: Arc<Mutex<Recent>>,
}

impl AckWaiter {
    /// Waits until every circuit of `ids` has been acknowledged (recently,
    /// or while it waits), for at most `timeout`; answers the ids still
    /// waiting when it gave up (empty: all acknowledged).
    pub async fn wait(mut self, ids: &[Uuid], timeout: Duration) -> Vec<Uuid> {
        let mut waiting: HashSet<Uuid> = {
            let recent = self.recent.lock().expect("never poisoned");
            ids.iter()
                .copied()
                .filter(|id| !recent.ids.contains(id))
                .collect()
        };
        let deadline = tokio::time::Instant::now() + timeout;
        while !waiting.is_empty() {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Ok(acked)) => {
                    for id in acked.iter() {
                        waiting.remove(id);
                    }
                }
                // Missed some: they may have been ours; the caller's
                // re-check of the route's status decides.
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => break,
            }
        }
        let mut left: Vec<Uuid> = waiting.into_iter().collect();
        left.sort();
        left
    }
}

/// The circuits a request answers only once their workers hold them:
/// started with [`Acks::expect`] before the request writes anything, added
/// to as it writes ([`Expected::add`]), waited for before it answers
/// ([`Expected::wait`]).
#[derive(Debug)]
pub struct Expected {
    waiter: AckWaiter,
    /// (circuit id, its worker's authority), in the order added.
    pending: Vec<(Uuid, String)>,
}

impl Acks {
    /// Starts listening for the acknowledgements a request will wait for;
    /// call before committing what will be acknowledged.
    pub fn expect(&self) -> Expected {
        Expected {
            waiter: self.subscribe(),
            pending: Vec::new(),
        }
    }
}

impl Expected {
    /// Waits for `route` too if its worker must acknowledge it before the
    /// answer: a Backend.AI worker that has not acknowledged it yet. A Lost
    /// worker cannot: that is `E10001` at once rather than after the timeout.
    pub fn add(&mut self, route: &Route, worker: &Worker) -> Result<(), Error> {
        if worker.backendai.is_none() || route.status == RouteStatus::Active {
            return Ok(());
        }
        if worker.status == WorkerStatus::Lost {
            return Err(Error::WorkerNotResponding {
                authority: worker.name.clone(),
            });
        }
        self.pending.push((route.id, worker.name.clone()));
        Ok(())
    }

    /// Waits (at most `timeout`) until the workers acknowledged every circuit
    /// added; `E10001` naming the first worker that did not. A circuit this
    /// replica heard no acknowledgement of counts as acknowledged when the
    /// store has it `Active` (another replica recorded it).
    pub async fn wait(self, store: &Store, timeout: Duration) -> Result<(), Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = self.pending.iter().map(|(id, _)| *id).collect();
        let missing = self.waiter.wait(&ids, timeout).await;
        for id in missing {
            if let Ok(route) = store.get_route(id).await
                && route.status == RouteStatus::Active
            {
                continue;
            }
            let authority = self
                .pending
                .iter()
                .find(|(p, _)| *p == id)
                .map_or("", |(_, a)| a.as_str());
            return Err(Error::WorkerNotResponding {
                authority: authority.to_owned(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiter_sees_acknowledgements_heard_after_it_subscribed() {
        let acks = Acks::default();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        acks.heard(vec![a]); // before: remembered
        let waiter = acks.subscribe();
        acks.heard(vec![b, Uuid::now_v7()]);
        acks.heard(vec![a]);
        assert!(
            waiter
                .wait(&[a, b], Duration::from_secs(30))
                .await
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_forgotten_acknowledgement_is_waited_for_again() {
        let acks = Acks::default();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        acks.heard(vec![a, b]);
        acks.forget(&[a]);
        // Nobody acknowledges `a` again: the wait gives up on it, however long.
        let waiter = acks.subscribe();
        assert_eq!(
            waiter.wait(&[a, b], Duration::from_millis(20)).await,
            vec![a]
        );
        let waiter = acks.subscribe();
        acks.heard(vec![a]);
        assert!(waiter.wait(&[a], Duration::from_secs(30)).await.is_empty());
    }

    #[tokio::test]
    async fn a_circuit_acknowledged_before_the_wait_is_not_waited_for_again() {
        let acks = Acks::default();
        let a = Uuid::now_v7();
        acks.heard(vec![a]);
        let waiter = acks.subscribe();
        assert!(waiter.wait(&[a], Duration::from_secs(30)).await.is_empty());
    }

    #[tokio::test]
    async fn a_waiter_gives_up_after_the_timeout_naming_what_is_missing() {
        let acks = Acks::default();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let waiter = acks.subscribe();
        acks.heard(vec![a]);
        let timeout = Duration::from_millis(20);
        let started = std::time::Instant::now();
        assert_eq!(waiter.wait(&[a, b], timeout).await, vec![b]);
        assert!(started.elapsed() >= timeout);
    }
}
