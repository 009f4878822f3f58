//! Worker health: what each observation does to a worker's status.
//!
//! Heartbeats (standalone) and pod readiness (Kubernetes) both arrive here as
//! [`Observation`]s, so the two sources can never disagree about the rules.

use super::types::WorkerStatus;

/// Something the coordinator learned about a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observation {
    /// The worker heartbeated.
    Heartbeat,
    /// No heartbeat for longer than the heartbeat timeout.
    HeartbeatTimeout,
    /// Its pod became Ready.
    PodReady,
    /// Its pod exists but is not Ready.
    PodNotReady,
    /// Its pod was deleted.
    PodDeleted,
}

/// The status after `observation`, or `None` when it does not change.
/// A draining worker stays draining whatever happens; it is on its way out.
pub fn next_status(current: WorkerStatus, observation: Observation) -> Option<WorkerStatus> {
    use Observation::*;
    use WorkerStatus::*;
    let next = match (current, observation) {
        (Draining, _) => Draining,
        // A heartbeat proves the process is alive; it does not override a pod
        // that Kubernetes reports as not ready.
        (Lost, Heartbeat) => Ready,
        (status, Heartbeat) => status,
        (_, HeartbeatTimeout) => Lost,
        (_, PodDeleted) => Lost,
        (Ready | NotReady, PodNotReady) => NotReady,
        (Lost, PodNotReady) => Lost,
        (NotReady, PodReady) => Ready,
        (status, PodReady) => status,
    };
    (next != current).then_some(next)
}

/// The statuses a heartbeat timeout changes: only workers in these are
/// checked for silence.
pub fn statuses_that_time_out() -> Vec<WorkerStatus> {
    WorkerStatus::ALL
        .into_iter()
        .filter(|s| next_status(*s, Observation::HeartbeatTimeout).is_some())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use Observation::*;
    use WorkerStatus::*;

    #[test]
    fn ready_and_not_ready_workers_time_out() {
        assert_eq!(statuses_that_time_out(), vec![Ready, NotReady]);
    }

    #[test]
    fn transitions() {
        let cases = [
            (Ready, Heartbeat, None),
            (Lost, Heartbeat, Some(Ready)),
            (NotReady, Heartbeat, None),
            (Ready, HeartbeatTimeout, Some(Lost)),
            (NotReady, HeartbeatTimeout, Some(Lost)),
            (Lost, HeartbeatTimeout, None),
            (Ready, PodNotReady, Some(NotReady)),
            (NotReady, PodReady, Some(Ready)),
            (Lost, PodReady, None),
            (Ready, PodDeleted, Some(Lost)),
            (NotReady, PodDeleted, Some(Lost)),
            (Draining, PodDeleted, None),
            (Draining, Heartbeat, None),
        ];
        for (from, obs, want) in cases {
            assert_eq!(next_status(from, obs), want, "{from:?} + {obs:?}");
        }
    }
}
