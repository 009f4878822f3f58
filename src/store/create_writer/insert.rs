//! The statements that write a batch of created routes with their
//! change-log rows: on PostgreSQL one statement text whatever the batch's
//! size (each column bound as an array and `unnest`ed), on SQLite a
//! multi-row `VALUES`.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use serde_json::value::RawValue;

use super::super::NOTIFY_CHANNEL;
use super::super::sql::{self, Arg, Column};
use crate::domain::{Revision, Route, StoredRoute, route_json};

/// The columns [`insert_values`] and [`unnest_args`] give, in order.
const ROUTE_COLUMNS: &str = "id, app_mode, session_id, endpoint_id, service, protocol, worker_id, \
     frontend_port, frontend_subdomain, spec, spec_wire, expires_at, revision, created_at, updated_at";

/// A batch's routes and change-log rows, from the arrays of [`unnest_args`]
/// (`$3`…`$19`): one statement text whatever the batch's size, so each
/// connection parses and plans it once.
const PG_UNNEST: &str = "ins AS (INSERT INTO routes ({ROUTE_COLUMNS}) \
     SELECT * FROM unnest($3::uuid[], $4::text[], $5::uuid[], $6::uuid[], $7::text[], $8::text[], \
     $9::uuid[], $10::int[], $11::text[], $12::jsonb[], $13::text[], $14::timestamptz[], \
     $15::bigint[], $16::timestamptz[], $17::timestamptz[]) {GUARD} {ON_CONFLICT} RETURNING 1), \
     log AS (INSERT INTO change_log (revision, kind, route_id, worker_id, payload, created_at, trace) \
     SELECT r, 'route_upsert', i, w, p, c, t \
     FROM unnest($15::bigint[], $3::uuid[], $9::uuid[], $18::jsonb[], $16::timestamptz[], $19::text[]) \
     AS l(r, i, w, p, c, t) {GUARD})";

/// The unlocked write ([`Store::prepare_unlocked`]): moves the revision from
/// `$1` to `$2` only if it is still `$1`, and writes the batch only then.
/// Answers (1 if the revision moved, routes inserted, notifications sent).
pub(super) static PG_UNLOCKED_INSERT: LazyLock<String> = LazyLock::new(|| {
    let unnest = PG_UNNEST
        .replace("{ROUTE_COLUMNS}", ROUTE_COLUMNS)
        .replace("{GUARD}", "WHERE EXISTS (SELECT 1 FROM saved)")
        .replace("{ON_CONFLICT}", "");
    format!(
        "WITH saved AS (UPDATE coordinator_state SET revision = $2 \
         WHERE id = 1 AND revision = $1 RETURNING revision), {unnest} \
         SELECT (SELECT COUNT(*) FROM saved), (SELECT COUNT(*) FROM ins), \
         (SELECT COUNT(*) FROM (SELECT pg_notify('{NOTIFY_CHANNEL}', revision::text) FROM saved) AS n)"
    )
});

/// The optimistic write inside a transaction holding the revision lock at
/// `$1` ([`Store::create_routes_at_once`]): a route a unique index refuses
/// is skipped, so the count of inserted routes tells whether all went in.
/// Answers (routes inserted, notifications sent).
pub(super) static PG_LOCKED_INSERT: LazyLock<String> = LazyLock::new(|| {
    let unnest = PG_UNNEST
        .replace("{ROUTE_COLUMNS}", ROUTE_COLUMNS)
        .replace("{GUARD}", "")
        .replace("{ON_CONFLICT}", "ON CONFLICT DO NOTHING");
    format!(
        "WITH {unnest}, saved AS (UPDATE coordinator_state SET revision = $2 \
         WHERE id = 1 AND revision = $1) \
         SELECT (SELECT COUNT(*) FROM ins), (SELECT COUNT(*) FROM pg_notify('{NOTIFY_CHANNEL}', $2::text))"
    )
});

fn to_raw<T: serde::Serialize>(value: &T) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).expect("domain types serialize")
}

/// The arguments of [`PG_UNLOCKED_INSERT`] and [`PG_LOCKED_INSERT`]: the
/// revision the batch starts from and the one it ends at, then one array per
/// route column ([`ROUTE_COLUMNS`]), the change-log payloads and the
/// changes' trace contexts (one per route).
pub(super) fn unnest_args(
    head: Revision,
    last: Revision,
    created: &[(StoredRoute, Route)],
    traces: Vec<Option<String>>,
) -> Vec<Arg> {
    let column = |f: &dyn Fn(&StoredRoute) -> Option<Uuid>| {
        Arg::Column(Column::Uuid(created.iter().map(|(r, _)| f(r)).collect()))
    };
    let text = |f: &dyn Fn(&StoredRoute) -> Option<String>| {
        Arg::Column(Column::Text(created.iter().map(|(r, _)| f(r)).collect()))
    };
    let time = |f: &dyn Fn(&StoredRoute) -> Option<DateTime<Utc>>| {
        Arg::Column(Column::Time(created.iter().map(|(r, _)| f(r)).collect()))
    };
    let json = |v: Vec<Box<RawValue>>| Arg::Column(Column::Json(v.into_iter().map(Some).collect()));
    vec![
        head.into(),
        last.into(),
        column(&|r| Some(r.id)),
        text(&|r| Some(r.spec.app_mode.as_str().to_owned())),
        column(&|r| r.spec.session_id),
        column(&|r| r.spec.endpoint_id),
        text(&|r| Some(r.spec.service.as_str().to_owned())),
        text(&|r| Some(r.spec.protocol.as_str().to_owned())),
        column(&|r| r.worker_id),
        Arg::Column(Column::Int32(
            created.iter().map(|(r, _)| r.port.map(i32::from)).collect(),
        )),
        text(&|r| r.subdomain.clone()),
        json(created.iter().map(|(r, _)| to_raw(&r.spec)).collect()),
        text(&|r| Some(route_json::spec_fragments(&r.spec))),
        time(&|r| r.spec.expires_at),
        Arg::Column(Column::Int(
            created.iter().map(|(r, _)| Some(r.revision)).collect(),
        )),
        time(&|r| Some(r.created_at)),
        time(&|r| Some(r.updated_at)),
        json(created.iter().map(|(_, wire)| to_raw(wire)).collect()),
        Arg::Column(Column::Text(traces)),
    ]
}

/// The `VALUES` rows of the batch's routes ([`ROUTE_COLUMNS`]) and their
/// arguments, numbered from `$1`.
fn insert_values(created: &[(StoredRoute, Route)]) -> (String, Vec<Arg>) {
    const COLUMNS: usize = 15;
    let mut args = Vec::with_capacity(created.len() * (COLUMNS + 6) + 2);
    for (r, _) in created {
        args.extend([
            r.id.into(),
            r.spec.app_mode.as_str().into(),
            r.spec.session_id.into(),
            r.spec.endpoint_id.into(),
            r.spec.service.as_str().into(),
            r.spec.protocol.as_str().into(),
            r.worker_id.into(),
            r.port.into(),
            r.subdomain.as_deref().into(),
            Arg::json(&r.spec),
            Arg::Text(Some(route_json::spec_fragments(&r.spec))),
            r.spec.expires_at.into(),
            r.revision.into(),
            r.created_at.into(),
            r.updated_at.into(),
        ]);
    }
    (sql::values(created.len(), COLUMNS, 1), args)
}

/// The statement inserting the batch's routes in one go (with `suffix`
/// after its rows), and its arguments.
pub(in crate::store) fn insert_statement(
    created: &[(StoredRoute, Route)],
    suffix: &str,
) -> (String, Vec<Arg>) {
    let (rows, args) = insert_values(created);
    (
        format!("INSERT INTO routes ({ROUTE_COLUMNS}) VALUES {rows}{suffix}"),
        args,
    )
}
