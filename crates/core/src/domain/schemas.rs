//! JSON Schemas of the fields and rules that the `JsonSchema` derive's own
//! attributes cannot state: string maps with bounded keys and values, hosts
//! and DNS names with their length bounds, and the rules that tie one field
//! of a route to another. Each states what [`super::validate`] checks, with
//! the limits of [`super::limits`]; the API document is built from them.
//!
//! Three rules compare two values or the clock and have no JSON Schema
//! form; the schemas say them in their descriptions: a health check's
//! `timeout_s` is at most its `interval_s`, a port range's low end is at most
//! its high end, and `expires_at` is in the future. Target ids are unique
//! within a route.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde_json::{Value, json};

use super::limits::{
    CIDR_PATTERN, DNS_NAME_PATTERN, ENV_NAME_PATTERN, HOST_PATTERN, MAX_DNS_NAME_LEN,
    MAX_LABEL_KEY_LEN, MAX_LABEL_VALUE_LEN, MAX_MAP_ENTRIES,
};

/// `labels`: up to 64 entries, any non-empty key.
pub fn labels(_: &mut SchemaGenerator) -> Schema {
    string_map(json!({ "minLength": 1, "maxLength": MAX_LABEL_KEY_LEN }))
}

/// `envs`: up to 64 entries, keys that a shell takes as variable names.
pub fn envs(_: &mut SchemaGenerator) -> Schema {
    string_map(json!({
        "minLength": 1,
        "maxLength": MAX_LABEL_KEY_LEN,
        "pattern": ENV_NAME_PATTERN,
    }))
}

/// `labels` in a patch: absent keeps them, `null` too.
pub fn optional_labels(g: &mut SchemaGenerator) -> Schema {
    nullable(labels(g))
}

/// `envs` in a patch: absent keeps them, `null` too.
pub fn optional_envs(g: &mut SchemaGenerator) -> Schema {
    nullable(envs(g))
}

fn string_map(keys: Value) -> Schema {
    json_schema!({
        "type": "object",
        "maxProperties": MAX_MAP_ENTRIES,
        "propertyNames": keys,
        "additionalProperties": { "type": "string", "maxLength": MAX_LABEL_VALUE_LEN },
    })
}

fn nullable(mut schema: Schema) -> Schema {
    schema.insert("type".into(), json!(["object", "null"]));
    schema
}

/// A target's or a port worker's host (the `Host` schema).
pub fn host(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<Host>()
}

/// A wildcard worker's domain (the `DnsName` schema).
pub fn dns_name(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<DnsName>()
}

/// An allowed client network (the `Cidr` schema).
pub fn cidrs(g: &mut SchemaGenerator) -> Schema {
    let item = g.subschema_for::<Cidr>();
    json_schema!({ "type": "array", "items": item })
}

/// Named schemas of strings, so the long patterns appear once in a document.
macro_rules! string_schema {
    ($ty:ident, $name:literal, $schema:expr) => {
        struct $ty;
        impl JsonSchema for $ty {
            fn schema_name() -> Cow<'static, str> {
                $name.into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                Schema::try_from($schema).expect("an object")
            }
        }
    };
}

string_schema!(
    Host,
    "Host",
    json!({
        "type": "string",
        "description": "An IP address (IPv6 bare or in brackets) or a DNS name of RFC 1123 \
            labels (dotted IPv4 addresses are such names); at most 253 characters",
        "pattern": HOST_PATTERN,
        "maxLength": MAX_DNS_NAME_LEN,
    })
);

string_schema!(
    DnsName,
    "DnsName",
    json!({
        "type": "string",
        "description": "A DNS name of RFC 1123 labels, at most 253 characters (a trailing \
            dot included)",
        "pattern": DNS_NAME_PATTERN,
        "maxLength": MAX_DNS_NAME_LEN,
    })
);

string_schema!(
    Cidr,
    "Cidr",
    json!({
        "type": "string",
        "description": "An IPv4 or IPv6 address, with or without a prefix length; a bare \
            address is a single host, and host bits are cleared",
        "pattern": CIDR_PATTERN,
    })
);

/// The rules of a route spec that tie fields together: the app mode decides
/// which id it carries and which protocols it may use, and a tcp route
/// cannot ask for a subdomain. One alternative per case, each complete, so a
/// generator need not search for their intersection.
pub fn route_spec_rules(schema: &mut Schema) {
    let uuid = json!({ "type": "string", "format": "uuid" });
    let rules = json!([
        {
            "properties": {
                "app_mode": { "const": "interactive" },
                "session_id": uuid,
                "endpoint_id": { "type": "null" },
                "protocol": { "enum": ["http", "grpc", "h2", "preopen"] },
            },
            "required": ["session_id"],
        },
        {
            "properties": {
                "app_mode": { "const": "interactive" },
                "session_id": uuid,
                "endpoint_id": { "type": "null" },
                "protocol": { "const": "tcp" },
                "frontend": { "properties": { "subdomain": { "type": "null" } } },
            },
            "required": ["session_id", "protocol"],
        },
        {
            "properties": {
                "app_mode": { "const": "inference" },
                "endpoint_id": uuid,
                "session_id": { "type": "null" },
                "protocol": { "enum": ["http", "grpc", "h2"] },
            },
            "required": ["app_mode", "endpoint_id"],
        },
    ]);
    schema.insert(
        "description".into(),
        json!(
            "What a manager sends to create (or upsert) a route. Interactive routes (the \
             default) carry a session_id and no endpoint_id, and a tcp one asks for no \
             subdomain; inference routes carry an endpoint_id and no session_id and serve \
             http, grpc or h2."
        ),
    );
    schema.insert("anyOf".into(), rules);
}

/// A requested frontend is a port or a subdomain, not both.
pub fn frontend_request_rules(schema: &mut Schema) {
    schema.insert(
        "anyOf".into(),
        json!([
            { "properties": { "port": { "type": "null" } } },
            { "properties": { "subdomain": { "type": "null" } } },
        ]),
    );
}
