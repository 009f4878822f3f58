//! A route's JSON written from stored pieces, byte for byte what serialising
//! the [`Route`](super::Route) gives, without decoding its spec.
//!
//! A route's JSON is its spec's fields in two runs (`app_mode` … `targets`,
//! then `access` … `circuit`) around the fields that come from where it sits
//! (`frontend`, `worker_id`) and after them its live fields (`status`,
//! `pending_reason`, `revision`, the times). The two runs depend on the spec
//! only, so they are rendered once when the spec is written
//! ([`spec_fragments`], stored beside the spec) and a snapshot splices the
//! rest in ([`write_route`]) instead of decoding and re-encoding every route.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::Revision;
use super::route::{Access, CircuitInfo, Frontend, HealthCheck, RouteSpec, RouteStatus, Target};
use super::types::{AppMode, Protocol};

/// The spec's fields before `frontend`, in [`Route`](super::Route)'s order.
#[derive(Serialize)]
struct Head<'a> {
    app_mode: &'a AppMode,
    session_id: &'a Option<Uuid>,
    endpoint_id: &'a Option<Uuid>,
    service: &'a str,
    protocol: &'a Protocol,
    targets: &'a [Target],
}

/// The spec's fields between `worker_id` and `status`, in [`Route`](super::Route)'s order.
#[derive(Serialize)]
struct Tail<'a> {
    access: &'a Access,
    labels: &'a BTreeMap<String, String>,
    envs: &'a BTreeMap<String, String>,
    args: &'a Option<serde_json::Value>,
    health_check: &'a Option<HealthCheck>,
    expires_at: &'a Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    circuit: &'a Option<CircuitInfo>,
}

/// The two runs of `spec`'s fields, without their braces, joined by a
/// newline (which compact JSON never contains).
pub fn spec_fragments(spec: &RouteSpec) -> String {
    let head = serde_json::to_string(&Head {
        app_mode: &spec.app_mode,
        session_id: &spec.session_id,
        endpoint_id: &spec.endpoint_id,
        service: &spec.service,
        protocol: &spec.protocol,
        targets: &spec.targets,
    })
    .expect("routes serialise");
    let tail = serde_json::to_string(&Tail {
        access: &spec.access,
        labels: &spec.labels,
        envs: &spec.envs,
        args: &spec.args,
        health_check: &spec.health_check,
        expires_at: &spec.expires_at,
        circuit: &spec.circuit,
    })
    .expect("routes serialise");
    format!("{}\n{}", &head[1..head.len() - 1], &tail[1..tail.len() - 1])
}

/// What a route's JSON takes beside its spec's fragments.
#[derive(Clone, Debug)]
pub struct Placed<'a> {
    pub id: Uuid,
    pub frontend: &'a Frontend,
    pub worker_id: Option<Uuid>,
    pub status: RouteStatus,
    pub pending_reason: Option<&'a str>,
    pub revision: Revision,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Appends the route's JSON to `out`; `false` (and nothing written) when
/// `fragments` is not what [`spec_fragments`] makes.
pub fn write_route(out: &mut Vec<u8>, fragments: &str, route: &Placed<'_>) -> bool {
    let Some((head, tail)) = fragments.split_once('\n') else {
        return false;
    };
    let value = |out: &mut Vec<u8>, v: &dyn erased::Json| v.write(out);
    out.extend_from_slice(b"{\"id\":");
    write_uuid(out, &route.id);
    out.push(b',');
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(b",\"frontend\":");
    value(out, route.frontend);
    out.extend_from_slice(b",\"worker_id\":");
    match &route.worker_id {
        Some(id) => write_uuid(out, id),
        None => out.extend_from_slice(b"null"),
    }
    out.push(b',');
    out.extend_from_slice(tail.as_bytes());
    out.extend_from_slice(b",\"status\":");
    value(out, &route.status);
    out.extend_from_slice(b",\"pending_reason\":");
    value(out, &route.pending_reason);
    out.extend_from_slice(b",\"revision\":");
    value(out, &route.revision);
    out.extend_from_slice(b",\"created_at\":");
    write_time(out, &route.created_at);
    out.extend_from_slice(b",\"updated_at\":");
    write_time(out, &route.updated_at);
    out.push(b'}');
    true
}

/// A UUID as serde writes it (hyphenated, lowercase, quoted), without
/// serde's escaping pass over characters that never need it.
fn write_uuid(out: &mut Vec<u8>, id: &Uuid) {
    out.push(b'"');
    out.extend_from_slice(
        id.hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .as_bytes(),
    );
    out.push(b'"');
}

/// A time as chrono's serde writes it (RFC 3339, `AutoSi` fractions, `Z`),
/// without going through `collect_str`, which escapes it a character at a
/// time (the largest cost of a snapshot row under `perf`).
fn write_time(out: &mut Vec<u8>, t: &DateTime<Utc>) {
    out.push(b'"');
    out.extend_from_slice(
        t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
            .as_bytes(),
    );
    out.push(b'"');
}

mod erased {
    /// A value written as JSON (serde without generics at the call site).
    pub trait Json {
        fn write(&self, out: &mut Vec<u8>);
    }
    impl<T: serde::Serialize> Json for T {
        fn write(&self, out: &mut Vec<u8>) {
            serde_json::to_writer(out, self).expect("routes serialise");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{FrontendMode, Route};

    fn spec(extra: serde_json::Value) -> RouteSpec {
        let mut v = serde_json::json!({
            "session_id": Uuid::new_v4(),
            "service": "jupyter",
            "targets": [{"host": "10.0.1.7", "port": 8888}, {"host": "h\"x", "port": 1, "weight": 3}],
        });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn times_and_ids_are_written_as_serde_writes_them() {
        use chrono::TimeZone;
        let base = Utc.with_ymd_and_hms(2026, 11, 29, 20, 5, 7).unwrap();
        for nanos in [0, 120_000_000, 123_000, 123_456_000, 1, 999_999_999] {
            let t = base + chrono::Duration::nanoseconds(nanos);
            let mut out = Vec::new();
            write_time(&mut out, &t);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(&t).unwrap()
            );
        }
        let id = Uuid::new_v4();
        let mut out = Vec::new();
        write_uuid(&mut out, &id);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            serde_json::to_string(&id).unwrap()
        );
    }

    #[test]
    fn spliced_json_is_what_serialising_the_route_gives() {
        let specs = [
            spec(serde_json::json!({})),
            spec(serde_json::json!({
                "labels": {"a": "b\nc"}, "envs": {"X": "1"}, "args": {"k": [1, 2.5, null]},
                "access": {"open_to_public": true, "allowed_client_ips": ["10.0.0.0/8"]},
                "health_check": {"path": "/h"}, "expires_at": "2099-01-02T03:04:05.123456Z",
                "circuit": {"user_id": Uuid::new_v4(), "session_ids": [Uuid::new_v4()]},
            })),
        ];
        let frontends = [
            Frontend::UNASSIGNED,
            Frontend {
                mode: Some(FrontendMode::Port),
                port: Some(10205),
                subdomain: None,
                url: Some("http://proxy:10205".into()),
            },
        ];
        for spec in &specs {
            for (frontend, worker, reason) in [
                (&frontends[0], None, Some("no worker")),
                (&frontends[1], Some(Uuid::new_v4()), None),
            ] {
                let now = Utc::now();
                let placed = Placed {
                    id: Uuid::new_v4(),
                    frontend,
                    worker_id: worker,
                    status: RouteStatus::Propagating,
                    pending_reason: reason,
                    revision: 42,
                    created_at: now,
                    updated_at: now,
                };
                let route = Route {
                    id: placed.id,
                    app_mode: spec.app_mode,
                    session_id: spec.session_id,
                    endpoint_id: spec.endpoint_id,
                    service: spec.service.clone(),
                    protocol: spec.protocol,
                    targets: spec.targets.clone(),
                    frontend: frontend.clone(),
                    worker_id: worker,
                    access: spec.access.clone(),
                    labels: spec.labels.clone(),
                    envs: spec.envs.clone(),
                    args: spec.args.clone(),
                    health_check: spec.health_check.clone(),
                    expires_at: spec.expires_at,
                    circuit: spec.circuit.clone(),
                    status: placed.status,
                    pending_reason: reason.map(str::to_owned),
                    revision: placed.revision,
                    created_at: now,
                    updated_at: now,
                };
                let mut out = Vec::new();
                assert!(write_route(&mut out, &spec_fragments(spec), &placed));
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    serde_json::to_string(&route).unwrap()
                );
            }
        }
        assert!(!write_route(
            &mut Vec::new(),
            "no newline",
            &Placed {
                id: Uuid::nil(),
                frontend: &Frontend::UNASSIGNED,
                worker_id: None,
                status: RouteStatus::Pending,
                pending_reason: None,
                revision: 1,
                created_at: Utc::now(),
                updated_at: Utc::now(),
            }
        ));
    }
}
