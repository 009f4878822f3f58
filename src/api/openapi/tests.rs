use std::collections::BTreeSet;

use super::*;

/// Every (method, path) the router serves, read from its `Debug` form
/// (axum has no other way to list routes): the paths of its route ids
/// and, per id, the methods of its `Allow` header.
fn routed() -> BTreeSet<(String, String)> {
    let (router, _) = finish(crate::api::endpoints);
    let text = format!("{router:?}");
    let routes = &text[..text.find("fallback_router").expect("a fallback router")];
    let id_and = |pattern: &str| {
        regex::Regex::new(pattern)
            .unwrap()
            .captures_iter(routes)
            .map(|c| (c[1].to_owned(), c[2].to_owned()))
            .collect::<Vec<_>>()
    };
    let paths: std::collections::HashMap<String, String> = id_and(r#"RouteId\((\d+)\): "([^"]+)""#)
        .into_iter()
        .collect();
    let methods = id_and(
        r#"RouteId\((\d+)\): MethodRouter\(MethodRouter \{.*?allow_header: Bytes\(b"([A-Z,]*)"\)"#,
    );
    assert!(
        !methods.is_empty(),
        "the router's Debug form changed:\n{text}"
    );
    assert_eq!(paths.len(), methods.len(), "{text}");
    methods
        .into_iter()
        .flat_map(|(id, allow)| {
            let path = paths[&id].clone();
            allow
                .split(',')
                .filter(|m| *m != "HEAD")
                .map(|m| (m.to_lowercase(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .filter(|k| ["get", "put", "post", "patch", "delete"].contains(&k.as_str()))
                .map(|m| (m.clone(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    documented(doc)
        .into_iter()
        .map(|(m, p)| {
            let op = &doc["paths"][&p][&m];
            (m, p, op)
        })
        .collect()
}

#[test]
fn the_router_and_the_document_have_the_same_operations() {
    let routed = routed();
    let documented = documented(&spec());
    // Read off the router's Debug form: make sure the reading found them all
    // (the native API has 20 operations; Backend.AI's come on top).
    assert!(routed.len() > 20, "{routed:?}");
    assert_eq!(
        routed.difference(&documented).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "routes without a documented operation"
    );
    assert_eq!(
        documented.difference(&routed).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "documented operations no route serves"
    );
}

#[test]
fn every_schema_reference_resolves_and_every_schema_is_used() {
    let doc = spec();
    assert_eq!(doc["openapi"], "3.1.0");
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let text = doc.to_string();
    let mut used = BTreeSet::new();
    for piece in text.split("#/components/schemas/").skip(1) {
        let name: String = piece.chars().take_while(|c| *c != '"').collect();
        assert!(schemas.contains_key(&name), "dangling reference to {name}");
        used.insert(name);
    }
    let unused: Vec<_> = schemas.keys().filter(|k| !used.contains(*k)).collect();
    assert!(unused.is_empty(), "unused schemas {unused:?}");
}

#[test]
fn operations_have_ids_security_and_problem_answers() {
    let doc = spec();
    let open = [
        "/livez",
        "/readyz",
        "/metrics",
        "/openapi.json",
        // Backend.AI: what upstream serves without credentials.
        "/status",
        "/health",
        "/health/livez",
        "/health/readyz",
        "/v2/conf",
        "/v2/proxy/auth",
        "/v2/proxy/{token}/{session_id}/add",
    ];
    let mut ids = BTreeSet::new();
    for (method, path, op) in operations(&doc) {
        // Backend.AI's paths answer errors in upstream's shape.
        let (error_type, denied) = if is_backendai(&path) {
            ("application/json", &["401"][..])
        } else {
            ("application/problem+json", &["401", "403"][..])
        };
        let id = op["operationId"].as_str().expect("an operation id");
        assert!(ids.insert(id.to_owned()), "{id} twice");
        assert!(op["summary"].is_string(), "{method} {path}");
        let responses = op["responses"].as_object().unwrap();
        assert!(
            responses.keys().any(|s| s.starts_with('2')),
            "{method} {path}: no success answer"
        );
        for (status, response) in responses {
            if status.starts_with('4') || status.starts_with('5') {
                assert!(
                    response["content"][error_type].is_object(),
                    "{method} {path} {status}: not an {error_type} error answer"
                );
            }
        }
        if open.contains(&path.as_str()) {
            assert!(op.get("security").is_none(), "{path} needs no token");
        } else {
            assert!(
                op["security"].as_array().is_some_and(|s| !s.is_empty()),
                "{method} {path}: no security"
            );
            for &status in denied {
                assert!(
                    responses.contains_key(status),
                    "{method} {path}: no {status}"
                );
            }
        }
        for parameter in op["parameters"].as_array().into_iter().flatten() {
            if parameter["in"] == "path" {
                assert!(path.contains(&format!("{{{}}}", parameter["name"].as_str().unwrap())));
            }
        }
        let templated = path.matches('{').count();
        let declared = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "path")
            .count();
        assert_eq!(templated, declared, "{method} {path}: path parameters");
    }
}

/// The schemes each operation takes, as `auth.rs` decides them.
#[test]
fn security_follows_the_auth_extractors() {
    let doc = spec();
    let schemes = |method: &str, path: &str| -> Vec<String> {
        doc["paths"][path][method]["security"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|r| r.as_object().unwrap().keys().cloned())
            .collect()
    };
    assert_eq!(
        schemes("post", "/workers/register"),
        ["workerBootstrap", "worker"]
    );
    assert_eq!(schemes("post", "/workers/{id}/heartbeat"), ["worker"]);
    assert_eq!(schemes("get", "/workers/{id}/watch"), ["worker"]);
    assert_eq!(schemes("get", "/workers/{id}"), ["manager", "worker"]);
    assert_eq!(schemes("delete", "/workers/{id}"), ["manager", "worker"]);
    assert_eq!(schemes("get", "/lookup"), ["manager", "worker"]);
    for (method, path) in [
        ("get", "/workers"),
        ("post", "/routes"),
        ("get", "/routes"),
        ("get", "/routes/watch"),
        ("put", "/routes/{id}"),
        ("patch", "/routes/{id}"),
        ("delete", "/routes/{id}"),
        ("delete", "/sessions/{session_id}"),
    ] {
        assert_eq!(schemes(method, path), ["manager"], "{method} {path}");
    }
    // Backend.AI: every credentialed path takes the api_secret either way.
    for (method, path, _) in operations(&doc) {
        let secured = (path.starts_with("/v2/endpoints")
            || path.starts_with("/api/")
            || path.starts_with("/v1/"))
            || matches!(
                path.as_str(),
                "/health/status"
                    | "/health/summary"
                    | "/health/endpoints"
                    | "/health/circuits/{circuit_id}"
            );
        if secured {
            assert_eq!(
                schemes(&method, &path),
                ["backendaiToken", "backendaiJwt"],
                "{method} {path}"
            );
        }
    }
    let kinds = doc["components"]["securitySchemes"].as_object().unwrap();
    assert_eq!(kinds.len(), 5);
    for (name, scheme) in kinds {
        if name == "backendaiToken" {
            assert_eq!(scheme["type"], "apiKey");
            assert_eq!(scheme["name"], "X-BackendAI-Token");
        } else {
            assert_eq!(scheme["scheme"], "bearer");
        }
    }
}

/// The paths Backend.AI's Manager and workers call.
fn is_backendai(path: &str) -> bool {
    path == "/status"
        || path == "/health"
        || ["/health/", "/v1/", "/v2/", "/api/"]
            .iter()
            .any(|prefix| path.starts_with(prefix))
}

#[test]
fn the_watch_streams_are_event_streams() {
    let doc = spec();
    for path in ["/workers/{id}/watch", "/routes/watch"] {
        let ok = &doc["paths"][path]["get"]["responses"]["200"]["content"];
        let events = ok["text/event-stream"]["schema"]["oneOf"]
            .as_array()
            .unwrap();
        let names: Vec<_> = events
            .iter()
            .map(|e| e["properties"]["event"]["const"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["snapshot", "upsert", "delete", "bookmark"]);
    }
}

fn pattern(schema: &Value) -> regex::Regex {
    regex::Regex::new(schema["pattern"].as_str().expect("a pattern")).unwrap()
}

/// The seven requests fuzzing found the old document calling valid and
/// the server refusing: the document refuses them now.
#[test]
fn the_document_refuses_what_the_server_refuses() {
    let doc = spec();
    let schemas = &doc["components"]["schemas"];
    // service: ""
    assert_eq!(
        schemas["RouteSpec"]["properties"]["service"]["minLength"],
        1
    );
    // GET /lookup?port=0
    let lookup = &doc["paths"]["/lookup"]["get"]["parameters"][0]["schema"];
    assert_eq!(lookup["properties"]["port"]["minimum"], 1);
    // GET /routes?limit=0
    let limit = doc["paths"]["/routes"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "limit")
        .unwrap();
    assert_eq!(limit["schema"]["minimum"], 1);
    // allowed_client_ips: [""]
    assert!(!pattern(&schemas["Cidr"]).is_match(""));
    // a registration with name "", api_url "" or a wildcard domain ""
    let registration = &schemas["WorkerRegistration"]["properties"];
    assert_eq!(registration["name"]["minLength"], 1);
    assert!(!pattern(&registration["api_url"]).is_match(""));
    assert!(!pattern(&schemas["DnsName"]).is_match(""));
}

/// The status page (`crate::api::ui`) is a page with its own cookie session
/// for a browser, not part of the API: its paths are merged into the router
/// beside the documented ones (`api::router`), never through `api_route`,
/// and the document leaves them out on purpose.
#[test]
fn the_status_page_is_left_out_of_the_document_on_purpose() {
    let doc = spec();
    for path in crate::api::ui::PATHS {
        assert!(doc["paths"].get(path).is_none(), "{path} is documented");
    }
    assert!(
        routed().iter().all(|(_, path)| !path.starts_with("/ui")),
        "a /ui path went through api_route"
    );
}
