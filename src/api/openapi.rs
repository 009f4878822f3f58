//! `GET /openapi.json`: the OpenAPI 3.1 description of every endpoint, with
//! schemas generated from the same Rust types the handlers use.

use std::sync::OnceLock;

use axum::response::IntoResponse;
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{Map, Value, json};

use super::routes::{Deleted, RouteList, SessionRoutes};
use super::workers::WorkerList;
use crate::domain::events::{Bookmark, Delete, Snapshot, Upsert};
use crate::domain::{Route, RoutePatch, RouteSpec, Worker, WorkerRegistration};
use crate::store::Removal;
use crate::wire::{Heartbeat, HeartbeatAck, Registration};

/// Who may call an endpoint.
#[derive(Clone, Copy)]
enum Auth {
    None,
    Manager,
    Bootstrap,
    WorkerSelf,
    WorkerSelfOrManager,
}

/// Produces the schema of a request or response body.
type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

struct Endpoint {
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    auth: Auth,
    params: &'static [(&'static str, &'static str, &'static str)],
    body: Option<SchemaFn>,
    ok: (u16, Option<SchemaFn>),
    errors: &'static [u16],
}

fn s<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

const ID: (&str, &str, &str) = ("id", "path", "uuid");
const SESSION: (&str, &str, &str) = ("session_id", "path", "uuid");

fn endpoints() -> Vec<Endpoint> {
    use Auth::*;
    vec![
        Endpoint {
            method: "get",
            path: "/livez",
            summary: "The process is alive",
            auth: None,
            params: &[],
            body: Option::None,
            ok: (200, Option::None),
            errors: &[],
        },
        Endpoint {
            method: "get",
            path: "/readyz",
            summary: "The database answers",
            auth: None,
            params: &[],
            body: Option::None,
            ok: (200, Option::None),
            errors: &[503],
        },
        Endpoint {
            method: "get",
            path: "/metrics",
            summary: "Prometheus metrics",
            auth: None,
            params: &[],
            body: Option::None,
            ok: (200, Option::None),
            errors: &[],
        },
        Endpoint {
            method: "get",
            path: "/openapi.json",
            summary: "This document",
            auth: None,
            params: &[],
            body: Option::None,
            ok: (200, Option::None),
            errors: &[],
        },
        Endpoint {
            method: "post",
            path: "/workers/register",
            summary: "Register a worker (201 new, 200 known). A live worker's name takes its own token or its pod; the bootstrap token alone registers new names and Lost workers (409 otherwise)",
            auth: Bootstrap,
            params: &[],
            body: Some(s::<WorkerRegistration>),
            ok: (201, Some(s::<Registration>)),
            errors: &[400, 401, 403, 409, 413, 415],
        },
        Endpoint {
            method: "get",
            path: "/workers",
            summary: "List workers",
            auth: Manager,
            params: &[],
            body: Option::None,
            ok: (200, Some(s::<WorkerList>)),
            errors: &[401, 403],
        },
        Endpoint {
            method: "get",
            path: "/workers/{id}",
            summary: "One worker",
            auth: WorkerSelfOrManager,
            params: &[ID],
            body: Option::None,
            ok: (200, Some(s::<Worker>)),
            errors: &[400, 401, 403, 404],
        },
        Endpoint {
            method: "delete",
            path: "/workers/{id}",
            summary: "Remove a worker; its routes move to other workers or become Pending",
            auth: WorkerSelfOrManager,
            params: &[ID, ("drain", "query", "boolean")],
            body: Option::None,
            ok: (200, Some(s::<Removal>)),
            errors: &[400, 401, 403, 404],
        },
        Endpoint {
            method: "post",
            path: "/workers/{id}/heartbeat",
            summary: "Keep a worker alive and acknowledge the revision it applied",
            auth: WorkerSelf,
            params: &[ID],
            body: Some(s::<Heartbeat>),
            ok: (200, Some(s::<HeartbeatAck>)),
            errors: &[400, 401, 403, 404],
        },
        Endpoint {
            method: "post",
            path: "/routes",
            summary: "Create a route: place it on a worker and allocate its frontend",
            auth: Manager,
            params: &[],
            body: Some(s::<RouteSpec>),
            ok: (201, Some(s::<Route>)),
            errors: &[400, 401, 403, 409, 413, 415, 503],
        },
        Endpoint {
            method: "get",
            path: "/routes",
            summary: "List routes (filters, keyset pagination)",
            auth: Manager,
            params: &[
                ("session_id", "query", "uuid"),
                ("endpoint_id", "query", "uuid"),
                ("worker_id", "query", "uuid"),
                ("service", "query", "string"),
                ("limit", "query", "integer"),
                ("cursor", "query", "string"),
            ],
            body: Option::None,
            ok: (200, Some(s::<RouteList>)),
            errors: &[400, 401, 403],
        },
        Endpoint {
            method: "get",
            path: "/routes/{id}",
            summary: "One route",
            auth: Manager,
            params: &[ID],
            body: Option::None,
            ok: (200, Some(s::<Route>)),
            errors: &[400, 401, 403, 404],
        },
        Endpoint {
            method: "put",
            path: "/routes/{id}",
            summary: "Create or update a route (idempotent; 201 created, 200 otherwise)",
            auth: Manager,
            params: &[ID],
            body: Some(s::<RouteSpec>),
            ok: (200, Some(s::<Route>)),
            errors: &[400, 401, 403, 409, 413, 415, 503],
        },
        Endpoint {
            method: "patch",
            path: "/routes/{id}",
            summary: "Change targets, access, labels, envs, args, health check or expiry",
            auth: Manager,
            params: &[ID],
            body: Some(s::<RoutePatch>),
            ok: (200, Some(s::<Route>)),
            errors: &[400, 401, 403, 404, 413, 415],
        },
        Endpoint {
            method: "delete",
            path: "/routes/{id}",
            summary: "Delete a route",
            auth: Manager,
            params: &[ID],
            body: Option::None,
            ok: (204, Option::None),
            errors: &[400, 401, 403, 404],
        },
        Endpoint {
            method: "get",
            path: "/sessions/{session_id}/routes",
            summary: "Every route of a session",
            auth: Manager,
            params: &[SESSION],
            body: Option::None,
            ok: (200, Some(s::<SessionRoutes>)),
            errors: &[400, 401, 403],
        },
        Endpoint {
            method: "delete",
            path: "/sessions/{session_id}",
            summary: "Delete every route of a terminated session, in one transaction",
            auth: Manager,
            params: &[SESSION],
            body: Option::None,
            ok: (200, Some(s::<Deleted>)),
            errors: &[400, 401, 403],
        },
        Endpoint {
            method: "get",
            path: "/lookup",
            summary: "Resolve a worker's port or subdomain to its route",
            auth: WorkerSelfOrManager,
            params: &[
                ("worker_id", "query", "uuid"),
                ("port", "query", "integer"),
                ("subdomain", "query", "string"),
            ],
            body: Option::None,
            ok: (200, Some(s::<Route>)),
            errors: &[400, 401, 403, 404],
        },
    ]
}

fn param_schema(kind: &str) -> Value {
    match kind {
        "uuid" => json!({"type": "string", "format": "uuid"}),
        other => json!({ "type": other }),
    }
}

fn build() -> Value {
    let settings = SchemaSettings::draft2020_12().with(|s| {
        s.definitions_path = "/components/schemas".into();
        s.meta_schema = None;
    });
    let mut generator = settings.into_generator();
    let problem = json!({
        "type": "object",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string", "format": "uri", "description": "https://appproxy.backend.ai/problems/<slug>"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "field": {"type": "string", "description": "The offending field, for invalid-request"},
            "existing": {"$ref": "#/components/schemas/Route", "description": "The route in the way, for conflict"}
        }
    });
    let mut paths = Map::new();
    for e in endpoints() {
        let mut op = Map::new();
        op.insert("summary".into(), e.summary.into());
        op.insert("operationId".into(), operation_id(e.method, e.path).into());
        let security = match e.auth {
            Auth::None => json!([]),
            Auth::Manager => json!([{"manager": []}]),
            Auth::Bootstrap => json!([{"workerBootstrap": []}, {"worker": []}]),
            Auth::WorkerSelf => json!([{"worker": []}]),
            Auth::WorkerSelfOrManager => json!([{"worker": []}, {"manager": []}]),
        };
        op.insert("security".into(), security);
        let params: Vec<Value> = e
            .params
            .iter()
            .map(|(name, place, kind)| {
                json!({"name": name, "in": place, "required": *place == "path", "schema": param_schema(kind)})
            })
            .collect();
        if !params.is_empty() {
            op.insert("parameters".into(), params.into());
        }
        if let Some(body) = e.body {
            op.insert(
                "requestBody".into(),
                json!({"required": true, "content": {"application/json": {"schema": body(&mut generator)}}}),
            );
        }
        let mut responses = Map::new();
        let ok = match e.ok.1 {
            Some(schema) => {
                json!({"description": "Success", "content": {"application/json": {"schema": schema(&mut generator)}}})
            }
            None => json!({"description": "Success"}),
        };
        responses.insert(e.ok.0.to_string(), ok);
        for code in e.errors {
            responses.insert(
                code.to_string(),
                json!({"description": "Problem", "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}),
            );
        }
        op.insert("responses".into(), responses.into());
        paths
            .entry(e.path)
            .or_insert_with(|| Value::Object(Map::new()))
            .as_object_mut()
            .expect("path items are objects")
            .insert(e.method.into(), op.into());
    }
    // The two Server-Sent Event streams.
    for (path, summary, security, mut params) in [
        (
            "/workers/{id}/watch",
            "A worker's routes as Server-Sent Events: snapshot, upsert, delete, bookmark",
            json!([{"worker": []}]),
            vec![
                json!({"name": "id", "in": "path", "required": true, "schema": param_schema("uuid")}),
            ],
        ),
        (
            "/routes/watch",
            "Every route change as Server-Sent Events (snapshot, upsert, delete, bookmark)",
            json!([{"manager": []}]),
            vec![],
        ),
    ] {
        params.push(json!({"name": "since", "in": "query", "required": false, "schema": {"type": "integer"},
            "description": "Resume after this revision (or send Last-Event-ID); absent or no longer retained: a snapshot first"}));
        let events = json!({"oneOf": [
            generator.subschema_for::<Snapshot>(),
            generator.subschema_for::<Upsert>(),
            generator.subschema_for::<Delete>(),
            generator.subschema_for::<Bookmark>(),
        ]});
        let op = json!({
            "summary": summary,
            "operationId": operation_id("get", path),
            "security": security,
            "parameters": params,
            "responses": {
                "200": {"description": "An event stream; each event's id is its revision and its data one of these",
                        "content": {"text/event-stream": {"schema": events}}},
                "400": {"description": "Problem", "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}},
                "401": {"description": "Problem", "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}},
                "403": {"description": "Problem", "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}},
                "503": {"description": "Problem", "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            }
        });
        paths.insert(path.into(), json!({ "get": op }));
    }
    generator.subschema_for::<Route>();
    let mut schemas = generator.take_definitions(true);
    schemas.insert("Problem".into(), problem);
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "appproxy-coordinator",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Control plane of the application proxy: workers, routes, sessions and lookup."
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "manager": {"type": "http", "scheme": "bearer", "description": "The manager token"},
                "workerBootstrap": {"type": "http", "scheme": "bearer", "description": "The worker bootstrap token"},
                "worker": {"type": "http", "scheme": "bearer", "description": "A per-worker token from registration"}
            }
        }
    })
}

fn operation_id(method: &str, path: &str) -> String {
    let words: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && !p.starts_with('{'))
        .collect();
    format!("{method}_{}", words.join("_").replace('.', "_"))
        + if path.ends_with('}') { "_one" } else { "" }
}

/// The document, built once.
pub fn spec() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(build)
}

pub async fn document() -> impl IntoResponse {
    axum::Json(spec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_reference_resolves() {
        let doc = spec();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let text = doc.to_string();
        for piece in text.split("#/components/schemas/").skip(1) {
            let name: String = piece.chars().take_while(|c| *c != '"').collect();
            assert!(schemas.contains_key(&name), "dangling reference to {name}");
        }
        assert!(schemas.contains_key("RouteSpec"));
        assert!(schemas.contains_key("WorkerRegistration"));
    }

    #[test]
    fn operation_ids_are_unique() {
        let mut ids: Vec<String> = endpoints()
            .iter()
            .map(|e| operation_id(e.method, e.path))
            .collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n);
    }
}
