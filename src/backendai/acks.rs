//! Waiting for workers' acknowledgements of circuits.
//!
//! Each replica hears every `appproxy_worker_circuit_added_event` on the bus
//! and passes the circuit ids it carries to [`Acks::heard`]. A request that
//! must answer only once the worker holds its circuit subscribes *before* it
//! commits (so an acknowledgement cannot slip by between the commit and the
//! wait) and then waits for its ids.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use uuid::Uuid;

/// The acknowledgements heard on this replica.
#[derive(Clone, Debug)]
pub struct Acks {
    tx: broadcast::Sender<Arc<Vec<Uuid>>>,
}

impl Default for Acks {
    fn default() -> Acks {
        Acks {
            tx: broadcast::channel(4096).0,
        }
    }
}

impl Acks {
    /// A worker acknowledged these circuits.
    pub fn heard(&self, circuits: Vec<Uuid>) {
        let _ = self.tx.send(Arc::new(circuits));
    }

    /// Starts listening; call before committing what will be acknowledged.
    pub fn subscribe(&self) -> AckWaiter {
        AckWaiter {
            rx: self.tx.subscribe(),
        }
    }
}

/// Acknowledgements heard since [`Acks::subscribe`].
#[derive(Debug)]
pub struct AckWaiter {
    rx: broadcast::Receiver<Arc<Vec<Uuid>>>,
}

impl AckWaiter {
    /// Waits until every circuit of `ids` has been acknowledged, for at most
    /// `timeout`; answers the ids still waiting when it gave up (empty: all
    /// acknowledged).
    pub async fn wait(mut self, ids: &[Uuid], timeout: Duration) -> Vec<Uuid> {
        let mut waiting: HashSet<Uuid> = ids.iter().copied().collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiter_sees_acknowledgements_heard_after_it_subscribed() {
        let acks = Acks::default();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        acks.heard(vec![a]); // before: not seen
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
