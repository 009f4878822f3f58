//! Kubernetes Events (`events.k8s.io/v1`) on the CRs: placement, failover and
//! drift repair, so `kubectl describe apr …` tells a route's story.
//!
//! Only `create` is used: every event is a new object (no series patching).

use chrono::Utc;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

use super::lease::micro;

/// The controller name events are reported by.
pub const REPORTING_CONTROLLER: &str = "appproxy.backend.ai/coordinator";

/// Why an event is recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The route was placed on a worker.
    Placed,
    /// The route moved to another worker because its worker was lost or drained.
    FailedOver,
    /// The route's worker is lost; it is about to move.
    FailingOver,
    /// The CR was deleted by hand and has been recreated.
    Restored,
    /// The CR's spec was edited by hand and has been reverted.
    DriftRepaired,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Placed => "Placed",
            Reason::FailedOver => "FailedOver",
            Reason::FailingOver => "FailingOver",
            Reason::Restored => "Restored",
            Reason::DriftRepaired => "DriftRepaired",
        }
    }

    fn action(self) -> &'static str {
        match self {
            Reason::Placed => "Place",
            Reason::FailedOver | Reason::FailingOver => "Failover",
            Reason::Restored | Reason::DriftRepaired => "Repair",
        }
    }

    fn type_(self) -> &'static str {
        match self {
            Reason::FailingOver | Reason::Restored | Reason::DriftRepaired => "Warning",
            Reason::Placed | Reason::FailedOver => "Normal",
        }
    }
}

/// Records events in one namespace.
#[derive(Clone)]
pub struct Recorder {
    api: Api<Event>,
    namespace: String,
    instance: String,
}

impl Recorder {
    pub fn new(client: kube::Client, namespace: &str, instance: &str) -> Recorder {
        Recorder {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            instance: instance.to_owned(),
        }
    }

    /// The event, ready to create (pure).
    pub fn event(&self, name: &str, uid: Option<&str>, reason: Reason, note: &str) -> Event {
        let now = Utc::now();
        Event {
            metadata: ObjectMeta {
                // The client-go convention: the object's name and a unique suffix.
                name: Some(format!(
                    "{name}.{:x}",
                    now.timestamp_nanos_opt().unwrap_or_default()
                )),
                namespace: Some(self.namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(micro(now)),
            action: Some(reason.action().to_owned()),
            reason: Some(reason.as_str().to_owned()),
            note: Some(note.chars().take(1024).collect()),
            type_: Some(reason.type_().to_owned()),
            reporting_controller: Some(REPORTING_CONTROLLER.to_owned()),
            reporting_instance: Some(self.instance.clone()),
            regarding: Some(ObjectReference {
                api_version: Some("appproxy.backend.ai/v1alpha1".to_owned()),
                kind: Some("AppProxyRoute".to_owned()),
                name: Some(name.to_owned()),
                namespace: Some(self.namespace.clone()),
                uid: uid.map(str::to_owned),
                ..ObjectReference::default()
            }),
            ..Event::default()
        }
    }

    /// Creates the event; failures are logged, never fatal.
    pub async fn record(&self, name: &str, uid: Option<&str>, reason: Reason, note: &str) {
        let event = self.event(name, uid, reason, note);
        if let Err(e) = self.api.create(&PostParams::default(), &event).await {
            tracing::warn!(error = %e, reason = reason.as_str(), "cannot record a Kubernetes event");
        }
    }
}
