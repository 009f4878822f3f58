//! What a stream sends: change-log entries and the events they become on a
//! worker's stream (only its own routes) or on the manager's (every route).

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Revision;
use super::route::Route;

/// The kind of a change-log row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    RouteUpsert,
    RouteDelete,
    WorkerUpsert,
    WorkerDelete,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::RouteUpsert => "route_upsert",
            ChangeKind::RouteDelete => "route_delete",
            ChangeKind::WorkerUpsert => "worker_upsert",
            ChangeKind::WorkerDelete => "worker_delete",
        }
    }

    pub fn parse(s: &str) -> Option<ChangeKind> {
        [
            ChangeKind::RouteUpsert,
            ChangeKind::RouteDelete,
            ChangeKind::WorkerUpsert,
            ChangeKind::WorkerDelete,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// One committed mutation. Route rows name the worker whose stream they
/// belong to (none for a route that is pending); upserts carry the route as it
/// was at `revision`.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub revision: Revision,
    pub kind: ChangeKind,
    pub route_id: Option<Uuid>,
    pub worker_id: Option<Uuid>,
    pub route: Option<Route>,
    pub created_at: DateTime<Utc>,
    /// The W3C `traceparent` of the request or message that made it, when
    /// there was one.
    pub trace: Option<String>,
}

/// A full table at `revision`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Snapshot {
    pub revision: Revision,
    pub routes: Vec<Route>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Upsert {
    pub revision: Revision,
    pub route: Box<Route>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Delete {
    pub revision: Revision,
    pub route_id: Uuid,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Bookmark {
    pub revision: Revision,
}

/// An event on a watch stream. The SSE `event:` is [`StreamEvent::name`], the
/// `id:` is the revision, and `data:` is the JSON of the payload.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamEvent {
    Snapshot(Snapshot),
    Upsert(Upsert),
    Delete(Delete),
    Bookmark(Bookmark),
}

impl StreamEvent {
    pub fn name(&self) -> &'static str {
        match self {
            StreamEvent::Snapshot(_) => "snapshot",
            StreamEvent::Upsert(_) => "upsert",
            StreamEvent::Delete(_) => "delete",
            StreamEvent::Bookmark(_) => "bookmark",
        }
    }

    pub fn revision(&self) -> Revision {
        match self {
            StreamEvent::Snapshot(e) => e.revision,
            StreamEvent::Upsert(e) => e.revision,
            StreamEvent::Delete(e) => e.revision,
            StreamEvent::Bookmark(e) => e.revision,
        }
    }

    /// The `data:` line.
    pub fn data(&self) -> String {
        let json = match self {
            StreamEvent::Snapshot(e) => serde_json::to_string(e),
            StreamEvent::Upsert(e) => serde_json::to_string(e),
            StreamEvent::Delete(e) => serde_json::to_string(e),
            StreamEvent::Bookmark(e) => serde_json::to_string(e),
        };
        json.expect("stream events serialise")
    }

    /// Parses an event received as `event:` name and `data:` JSON.
    pub fn parse(name: &str, data: &str) -> Result<StreamEvent, String> {
        let e = |err: serde_json::Error| format!("bad {name} event: {err}");
        Ok(match name {
            "snapshot" => StreamEvent::Snapshot(serde_json::from_str(data).map_err(e)?),
            "upsert" => StreamEvent::Upsert(serde_json::from_str(data).map_err(e)?),
            "delete" => StreamEvent::Delete(serde_json::from_str(data).map_err(e)?),
            "bookmark" => StreamEvent::Bookmark(serde_json::from_str(data).map_err(e)?),
            other => return Err(format!("unknown event {other:?}")),
        })
    }
}

/// Which changes a stream shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audience {
    /// One worker: only routes placed on it.
    Worker(Uuid),
    /// A manager: every route.
    Manager,
}

impl Audience {
    /// The event `change` becomes on this stream, if any.
    pub fn event(self, change: &Change) -> Option<StreamEvent> {
        let mine = match self {
            Audience::Worker(w) => change.worker_id == Some(w),
            Audience::Manager => true,
        };
        if !mine {
            return None;
        }
        match (change.kind, &change.route, change.route_id) {
            (ChangeKind::RouteUpsert, Some(route), _) => {
                // A manager sees a route that lost its worker as an upsert
                // (now Pending); a worker never receives one it does not serve.
                Some(StreamEvent::Upsert(Upsert {
                    revision: change.revision,
                    route: Box::new(route.clone()),
                }))
            }
            (ChangeKind::RouteDelete, _, Some(route_id)) => Some(StreamEvent::Delete(Delete {
                revision: change.revision,
                route_id,
            })),
            _ => None,
        }
    }

    /// True when `change` ends this stream (its worker was removed).
    pub fn ends_with(self, change: &Change) -> bool {
        matches!(self, Audience::Worker(w)
            if change.kind == ChangeKind::WorkerDelete && change.worker_id == Some(w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(kind: ChangeKind, worker: Option<Uuid>) -> Change {
        Change {
            revision: 7,
            kind,
            route_id: Some(Uuid::nil()),
            worker_id: worker,
            route: None,
            created_at: Utc::now(),
            trace: None,
        }
    }

    #[test]
    fn workers_see_only_their_own_route_events() {
        let me = Uuid::new_v4();
        let other = Uuid::new_v4();
        let del = change(ChangeKind::RouteDelete, Some(me));
        assert_eq!(
            Audience::Worker(me).event(&del),
            Some(StreamEvent::Delete(Delete {
                revision: 7,
                route_id: Uuid::nil()
            }))
        );
        assert_eq!(Audience::Worker(other).event(&del), None);
        assert!(Audience::Manager.event(&del).is_some());
        let pending = change(ChangeKind::RouteDelete, None);
        assert_eq!(Audience::Worker(me).event(&pending), None);
        let worker_change = change(ChangeKind::WorkerUpsert, Some(me));
        assert_eq!(Audience::Worker(me).event(&worker_change), None);
        assert_eq!(Audience::Manager.event(&worker_change), None);
    }

    #[test]
    fn a_stream_ends_when_its_worker_is_deleted() {
        let me = Uuid::new_v4();
        assert!(Audience::Worker(me).ends_with(&change(ChangeKind::WorkerDelete, Some(me))));
        assert!(!Audience::Worker(me).ends_with(&change(ChangeKind::WorkerDelete, None)));
        assert!(!Audience::Manager.ends_with(&change(ChangeKind::WorkerDelete, Some(me))));
    }

    #[test]
    fn events_round_trip_through_their_wire_form() {
        let e = StreamEvent::Bookmark(Bookmark { revision: 42 });
        assert_eq!(StreamEvent::parse(e.name(), &e.data()).unwrap(), e);
        assert!(StreamEvent::parse("nope", "{}").is_err());
    }
}
