//! Worker health: what each observation does to a worker's status.
//!
//! Heartbeats (standalone) and pod readiness (Kubernetes) both arrive here as
//! [`Observation`]s, so the two sources can never disagree about the rules.

use chrono::{DateTime, Utc};

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

/// What Kubernetes last said about a worker's pod (kept with the worker;
/// unknown outside Kubernetes or before the pod watcher saw the pod).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodState {
    Ready,
    NotReady,
    /// Deleted, or terminating: it never comes back.
    Gone,
}

impl PodState {
    pub fn as_str(self) -> &'static str {
        match self {
            PodState::Ready => "Ready",
            PodState::NotReady => "NotReady",
            PodState::Gone => "Gone",
        }
    }

    pub fn parse(s: &str) -> Option<PodState> {
        [PodState::Ready, PodState::NotReady, PodState::Gone]
            .into_iter()
            .find(|p| p.as_str() == s)
    }

    /// The pod state a pod observation reports (`None` for heartbeats).
    pub fn of(observation: Observation) -> Option<PodState> {
        match observation {
            Observation::PodReady => Some(PodState::Ready),
            Observation::PodNotReady => Some(PodState::NotReady),
            Observation::PodDeleted => Some(PodState::Gone),
            Observation::Heartbeat | Observation::HeartbeatTimeout => None,
        }
    }
}

/// [`next_status`] for a worker whose pod is known to be in state `pod`: what
/// Kubernetes says about the pod wins over what the worker says about itself,
/// so a heartbeat never revives a worker whose pod is gone, and makes one
/// whose pod is not ready `NotReady`, not `Ready`.
pub fn next_status_with_pod(
    current: WorkerStatus,
    pod: Option<PodState>,
    observation: Observation,
) -> Option<WorkerStatus> {
    match (observation, pod) {
        (Observation::Heartbeat, Some(PodState::Gone)) => None,
        (Observation::Heartbeat, Some(PodState::NotReady)) => {
            next_status(current, observation).map(|_| WorkerStatus::NotReady)
        }
        _ => next_status(current, observation),
    }
}

/// The status a worker (re-)registering gets, given its pod's state.
pub fn registered_status(pod: Option<PodState>) -> WorkerStatus {
    match pod {
        None | Some(PodState::Ready) => WorkerStatus::Ready,
        Some(PodState::NotReady) => WorkerStatus::NotReady,
        Some(PodState::Gone) => WorkerStatus::Lost,
    }
}

/// The statuses a heartbeat timeout changes: only workers in these are
/// checked for silence.
pub fn statuses_that_time_out() -> Vec<WorkerStatus> {
    WorkerStatus::ALL
        .into_iter()
        .filter(|s| next_status(*s, Observation::HeartbeatTimeout).is_some())
        .collect()
}

/// Workers last heard from before this cutoff are silent (`None`: none is).
/// A worker's heartbeat deadline is one `timeout` after the later of its
/// last heartbeat and `watching_since`, the time this coordinator began
/// watching: a worker cannot have heartbeated to a coordinator that was not
/// running (stopped for an upgrade, or just switched to, with imported
/// workers whose last heartbeat went to another one), so it gets a full
/// timeout from that moment, never fails over merely for the gap.
pub fn silence_cutoff(
    now: DateTime<Utc>,
    timeout: chrono::Duration,
    watching_since: Option<DateTime<Utc>>,
) -> Option<DateTime<Utc>> {
    let cutoff = now - timeout;
    match watching_since {
        Some(since) if since >= cutoff => None,
        _ => Some(cutoff),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Observation::*;
    use WorkerStatus::*;

    #[test]
    fn nobody_is_silent_until_a_timeout_after_watching_began() {
        let t0 = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let timeout = chrono::Duration::seconds(30);
        let s = chrono::Duration::seconds;
        // Without a start (tests, a pass on its own): the plain deadline.
        assert_eq!(silence_cutoff(t0, timeout, None), Some(t0 - timeout));
        // Within one timeout of the start: nobody, however old the heartbeat.
        assert_eq!(silence_cutoff(t0 + s(29), timeout, Some(t0)), None);
        assert_eq!(silence_cutoff(t0 + s(30), timeout, Some(t0)), None);
        // After it: the plain deadline again.
        assert_eq!(
            silence_cutoff(t0 + s(31), timeout, Some(t0)),
            Some(t0 + s(1))
        );
    }

    #[test]
    fn ready_and_not_ready_workers_time_out() {
        assert_eq!(statuses_that_time_out(), vec![Ready, NotReady]);
    }

    #[test]
    fn the_pod_wins_over_the_worker() {
        use PodState::Gone;
        let not_ready = Some(PodState::NotReady);
        // A deleted or terminating pod's worker stays Lost, whatever it says.
        assert_eq!(next_status_with_pod(Lost, Some(Gone), Heartbeat), None);
        assert_eq!(
            next_status_with_pod(Ready, Some(Gone), PodDeleted),
            Some(Lost)
        );
        // A worker whose pod is not ready comes back NotReady, not Ready.
        assert_eq!(
            next_status_with_pod(Lost, not_ready, Heartbeat),
            Some(NotReady)
        );
        assert_eq!(next_status_with_pod(NotReady, not_ready, Heartbeat), None);
        // Unknown or ready pods: the plain rules.
        for pod in [None, Some(PodState::Ready)] {
            assert_eq!(next_status_with_pod(Lost, pod, Heartbeat), Some(Ready));
            assert_eq!(next_status_with_pod(Ready, pod, Heartbeat), None);
        }
        assert_eq!(
            next_status_with_pod(NotReady, not_ready, PodReady),
            Some(Ready)
        );
        assert_eq!(next_status_with_pod(Draining, Some(Gone), Heartbeat), None);
        // Registration.
        assert_eq!(registered_status(None), Ready);
        assert_eq!(registered_status(Some(PodState::Ready)), Ready);
        assert_eq!(registered_status(not_ready), NotReady);
        assert_eq!(registered_status(Some(Gone)), Lost);
        for p in [PodState::Ready, PodState::NotReady, Gone] {
            assert_eq!(PodState::parse(p.as_str()), Some(p));
        }
        assert_eq!(PodState::of(PodDeleted), Some(Gone));
        assert_eq!(PodState::of(Heartbeat), None);
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
