//! An in-process Kubernetes API server, just enough of one for the real
//! `kube::Client` to talk to over HTTP: list and watch (resourceVersion,
//! bookmarks, `410 Gone` for a compacted resourceVersion), get, create,
//! replace (with optimistic concurrency), server-side apply and merge patch,
//! the status subresource, and delete — for any namespaced resource (CRs,
//! pods, Leases, Events).
//!
//! Server-side apply tracks field managers as a real API server does, in
//! outline: every leaf a manager applied or merge-patched is its own (force
//! takes it from others), and a field its manager stops applying is removed
//! unless another manager owns it too.
//!
//! Faults as real API servers show them can be injected per verb and path,
//! for a number of requests, optionally only for one replica's client (see
//! [`FakeApiServer::client_as`]): an error status, or a request that hangs.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

/// `(api prefix, namespace, plural)`, e.g. `("apis/appproxy.backend.ai/v1alpha1", "ns", "appproxyroutes")`.
type Collection = (String, String, String);

#[derive(Clone, Debug)]
pub struct WatchEvent {
    pub rv: u64,
    pub collection: Collection,
    pub kind: &'static str,
    pub object: Value,
    /// The object before a `MODIFIED`.
    pub previous: Option<Value>,
}

impl WatchEvent {
    /// What a watch with `selector` sees of this event: an object modified
    /// into the selection is `ADDED`, one modified out of it `DELETED`.
    fn seen_by(&self, selector: Option<&str>) -> Option<(&'static str, &Value)> {
        let now = matches_labels(&self.object, selector);
        let before = self
            .previous
            .as_ref()
            .is_some_and(|p| matches_labels(p, selector));
        match (self.kind, now, before) {
            ("MODIFIED", true, false) => Some(("ADDED", &self.object)),
            ("MODIFIED", false, true) => Some(("DELETED", &self.object)),
            (_, true, _) => Some((self.kind, &self.object)),
            _ => None,
        }
    }
}

/// One request as received, for assertions.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub status: u16,
    /// Sent by the test itself (playing kubelet or an operator), not the coordinator.
    pub by_test: bool,
    /// When the answer was sent.
    pub at: std::time::Instant,
    /// When the request arrived.
    pub arrived: std::time::Instant,
    pub user_agent: String,
}

/// What an injected fault answers.
#[derive(Clone, Debug)]
pub enum Answer {
    /// This status (503, 500, 422, …) with a `Status` body.
    Status(u16),
    /// Nothing, ever: the request hangs.
    Hang,
    /// The usual answer, after this long (the request takes effect then).
    Delay(Duration),
}

/// A fault for the next `times` requests with `method` whose path contains
/// `path`, from the replica `from` only (when set).
#[derive(Clone, Debug)]
pub struct Fault {
    pub method: String,
    pub path: String,
    pub from: Option<String>,
    pub times: u64,
    pub answer: Answer,
}

impl Fault {
    pub fn new(method: &str, path: &str, answer: Answer) -> Fault {
        Fault {
            method: method.to_owned(),
            path: path.to_owned(),
            from: None,
            times: u64::MAX,
            answer,
        }
    }

    pub fn times(mut self, times: u64) -> Fault {
        self.times = times;
        self
    }

    pub fn from(mut self, replica: &str) -> Fault {
        self.from = Some(replica.to_owned());
        self
    }
}

/// The header [`FakeApiServer::client_as`] marks a replica's requests with.
const REPLICA_HEADER: &str = "x-fake-replica";

/// The field owners of one object: manager → JSON pointers of its leaves.
type Managers = BTreeMap<String, std::collections::BTreeSet<String>>;

#[derive(Default)]
struct Inner {
    faults: Vec<Fault>,
    /// Delayed requests not answered yet.
    delayed: usize,
    managed: BTreeMap<(Collection, String), Managers>,
    rv: u64,
    objects: BTreeMap<Collection, BTreeMap<String, Value>>,
    history: Vec<WatchEvent>,
    /// Watches from a resourceVersion at or below this get `410 Gone`.
    compacted: u64,
    log: Vec<Logged>,
    /// Watches answered with `410 Gone`.
    gone: u64,
}

#[derive(Clone)]
pub struct FakeApiServer {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<WatchEvent>,
    /// Bumped to close every open watch.
    kick: Arc<watch::Sender<u64>>,
    pub url: String,
    pub bookmark_interval: Duration,
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    (
        StatusCode::from_u16(code).unwrap(),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn ok(object: &Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        object.to_string(),
    )
        .into_response()
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The JSON pointers of `value`'s leaves (arrays and scalars are leaves, as
/// atomic lists are), below `prefix`; for a patch's metadata, only labels and
/// annotations count.
fn leaves(value: &Value, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
    match value {
        Value::Object(o) if !o.is_empty() => {
            for (k, v) in o {
                let path = format!("{prefix}/{}", escape(k));
                let meta = path.starts_with("/metadata/");
                if !meta
                    || path.starts_with("/metadata/labels")
                    || path.starts_with("/metadata/annotations")
                {
                    leaves(v, &path, out);
                }
            }
        }
        Value::Null => {}
        _ if !prefix.is_empty() && prefix != "/metadata" => {
            out.insert(prefix.to_owned());
        }
        _ => {}
    }
}

/// Removes the field at `pointer` from `object`.
fn remove_at(object: &mut Value, pointer: &str) {
    let Some((parent, key)) = pointer.rsplit_once('/') else {
        return;
    };
    let key = key.replace("~1", "/").replace("~0", "~");
    if let Some(Value::Object(o)) = object.pointer_mut(parent) {
        o.remove(&key);
    }
}

/// Overlapping pointers: one is the other or lies inside it.
fn overlaps(a: &str, b: &str) -> bool {
    a == b || a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/"))
}

/// `a=b,c=d` equality selectors.
fn matches_labels(object: &Value, selector: Option<&str>) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    selector.split(',').all(|term| {
        let (k, v) = term.split_once('=').unwrap_or((term, ""));
        let v = v.trim_start_matches('=');
        object["metadata"]["labels"][k].as_str() == Some(v)
    })
}

/// Splits `/api/v1/namespaces/ns/pods/name/status` into parts.
fn parse_path(path: &str) -> Option<(Collection, Option<String>, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match *parts.first()? {
        "api" => (parts[..2].join("/"), &parts[2..]),
        "apis" => (parts[..3].join("/"), &parts[3..]),
        _ => return None,
    };
    if rest.first() != Some(&"namespaces") || rest.len() < 3 {
        return None;
    }
    let collection = (prefix, rest[1].to_owned(), rest[2].to_owned());
    Some((
        collection,
        rest.get(3).map(|s| (*s).to_owned()),
        rest.get(4).map(|s| (*s).to_owned()),
    ))
}

/// Resources whose main endpoint ignores `status` (it has a subresource).
fn has_status_subresource(plural: &str) -> bool {
    matches!(plural, "appproxyroutes" | "pods")
}

fn kind_of(plural: &str) -> &'static str {
    match plural {
        "appproxyroutes" => "AppProxyRoute",
        "pods" => "Pod",
        "leases" => "Lease",
        "events" => "Event",
        _ => "Unknown",
    }
}

impl FakeApiServer {
    pub async fn start() -> FakeApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = FakeApiServer {
            inner: Arc::new(Mutex::new(Inner::default())),
            events: broadcast::channel(4096).0,
            kick: Arc::new(watch::channel(0).0),
            url: format!("http://{addr}"),
            bookmark_interval: Duration::from_millis(300),
        };
        let app = Router::new().fallback(handle).with_state(server.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        server
    }

    /// A client for the test's own calls (a kubelet, an operator with kubectl),
    /// kept out of [`FakeApiServer::authorizations`].
    pub fn actor_client(&self) -> kube::Client {
        let mut config = kube::Config::new(self.url.parse().unwrap());
        config.default_namespace = "appproxy".into();
        config
            .headers
            .push(("x-fake-actor".parse().unwrap(), "test".parse().unwrap()));
        kube::Client::try_from(config).unwrap()
    }

    /// A real client pointed at this server, its requests marked as the
    /// replica `name`'s (for faults aimed at one replica).
    pub fn client_as(&self, name: &str) -> kube::Client {
        let mut config = kube::Config::new(self.url.parse().unwrap());
        config.default_namespace = "appproxy".into();
        config
            .headers
            .push((REPLICA_HEADER.parse().unwrap(), name.parse().unwrap()));
        appproxy_coordinator::k8s::client_from(config).unwrap()
    }

    /// Injects `fault`; faults are matched in the order injected.
    pub fn inject(&self, fault: Fault) {
        self.inner.lock().unwrap().faults.push(fault);
    }

    /// How many delayed requests are waiting for their answer.
    pub fn delayed(&self) -> usize {
        self.inner.lock().unwrap().delayed
    }

    /// Removes every injected fault.
    pub fn heal(&self) {
        self.inner.lock().unwrap().faults.clear();
    }

    /// The injected answer for a request, if any (and counts it).
    fn fault_for(&self, method: &Method, path: &str, headers: &HeaderMap) -> Option<Answer> {
        let replica = headers.get(REPLICA_HEADER).and_then(|v| v.to_str().ok());
        let mut inner = self.inner.lock().unwrap();
        let fault = inner.faults.iter_mut().find(|f| {
            f.times > 0
                && f.method.eq_ignore_ascii_case(method.as_str())
                && path.contains(&f.path)
                && f.from.as_deref().is_none_or(|r| Some(r) == replica)
        })?;
        fault.times -= 1;
        Some(fault.answer.clone())
    }

    /// A real client pointed at this server, made as the coordinator makes its own.
    pub fn client(&self) -> kube::Client {
        let mut config = kube::Config::new(self.url.parse().unwrap());
        config.default_namespace = "appproxy".into();
        appproxy_coordinator::k8s::client_from(config).unwrap()
    }

    // ---- direct access for tests ---------------------------------------------

    pub fn objects(&self, prefix: &str, ns: &str, plural: &str) -> BTreeMap<String, Value> {
        let inner = self.inner.lock().unwrap();
        inner
            .objects
            .get(&(prefix.to_owned(), ns.to_owned(), plural.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    pub fn get(&self, prefix: &str, ns: &str, plural: &str, name: &str) -> Option<Value> {
        self.objects(prefix, ns, plural).remove(name)
    }

    /// How many watches were answered with `410 Gone`.
    pub fn gone(&self) -> u64 {
        self.inner.lock().unwrap().gone
    }

    pub fn log(&self) -> Vec<Logged> {
        self.inner.lock().unwrap().log.clone()
    }

    /// What the requests so far needed from RBAC, as Kubernetes authorizes
    /// them: `(api group, resource[/subresource], verb)`. A server-side apply
    /// that creates its object needs `create` as well as `patch`.
    pub fn authorizations(&self) -> std::collections::BTreeSet<(String, String, String)> {
        let mut needed = std::collections::BTreeSet::new();
        for l in self.log().into_iter().filter(|l| !l.by_test) {
            let Some(((prefix, _, plural), name, sub)) = parse_path(&l.path) else {
                continue;
            };
            let group = match prefix.split('/').collect::<Vec<_>>()[..] {
                ["apis", group, _] => group.to_owned(),
                _ => String::new(),
            };
            let resource = match sub {
                Some(sub) => format!("{plural}/{sub}"),
                None => plural,
            };
            let watching = l
                .query
                .split('&')
                .any(|kv| kv == "watch=true" || kv == "watch=1");
            let verbs: &[&str] = match (l.method.as_str(), name.is_some()) {
                ("GET", false) if watching => &["watch"],
                ("GET", false) => &["list"],
                ("GET", true) => &["get"],
                ("POST", _) => &["create"],
                ("PUT", _) => &["update"],
                ("PATCH", _) if l.status == 201 => &["patch", "create"],
                ("PATCH", _) => &["patch"],
                ("DELETE", _) => &["delete"],
                _ => &[],
            };
            for verb in verbs {
                needed.insert((group.clone(), resource.clone(), (*verb).to_owned()));
            }
        }
        needed
    }

    /// Compacts the watch history (every open watch is closed, and resuming
    /// from any resourceVersion seen so far answers `410 Gone`), running `gap`
    /// on the objects meanwhile — changes no watch will ever report.
    pub fn expire_watches(
        &self,
        gap: impl FnOnce(&mut BTreeMap<Collection, BTreeMap<String, Value>>),
    ) {
        let mut inner = self.inner.lock().unwrap();
        inner.rv += 1;
        inner.compacted = inner.rv;
        inner.history.clear();
        gap(&mut inner.objects);
        self.kick.send_modify(|k| *k += 1);
    }

    // ---- the API -------------------------------------------------------------

    fn emit(
        &self,
        inner: &mut Inner,
        collection: &Collection,
        kind: &'static str,
        object: Value,
        previous: Option<Value>,
    ) {
        let e = WatchEvent {
            rv: inner.rv,
            collection: collection.clone(),
            kind,
            object,
            previous,
        };
        inner.history.push(e.clone());
        let _ = self.events.send(e);
    }

    fn write(
        &self,
        collection: &Collection,
        name: &str,
        mut object: Value,
        created: bool,
    ) -> Value {
        let mut inner = self.inner.lock().unwrap();
        inner.rv += 1;
        let rv = inner.rv;
        object["metadata"]["resourceVersion"] = rv.to_string().into();
        let previous = inner
            .objects
            .entry(collection.clone())
            .or_default()
            .insert(name.to_owned(), object.clone());
        self.emit(
            &mut inner,
            collection,
            if created { "ADDED" } else { "MODIFIED" },
            object.clone(),
            previous,
        );
        object
    }

    fn create(&self, collection: &Collection, mut object: Value) -> Response {
        let Some(name) = object["metadata"]["name"].as_str().map(str::to_owned) else {
            return status(422, "Invalid", "metadata.name is required");
        };
        if self
            .get(&collection.0, &collection.1, &collection.2, &name)
            .is_some()
        {
            return status(409, "AlreadyExists", &format!("{name} already exists"));
        }
        object["metadata"]["namespace"] = collection.1.clone().into();
        object["metadata"]["uid"] = uuid::Uuid::new_v4().to_string().into();
        object["metadata"]["creationTimestamp"] = chrono::Utc::now()
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string()
            .into();
        object["metadata"]["generation"] = 1.into();
        if let Some(obj) = object.as_object_mut() {
            obj.entry("kind")
                .or_insert_with(|| kind_of(&collection.2).into());
        }
        let written = self.write(collection, &name, object, true);
        (
            StatusCode::CREATED,
            [("content-type", "application/json")],
            written.to_string(),
        )
            .into_response()
    }

    /// Writes `next` over `current` unless nothing changed (a no-op write keeps
    /// the resourceVersion, as a real API server does).
    fn update(
        &self,
        collection: &Collection,
        name: &str,
        current: &Value,
        mut next: Value,
    ) -> Response {
        for k in ["uid", "creationTimestamp", "namespace", "name"] {
            next["metadata"][k] = current["metadata"][k].clone();
        }
        next["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
        let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
        next["metadata"]["generation"] =
            (generation + i64::from(next.get("spec") != current.get("spec"))).into();
        if &next == current {
            return ok(current);
        }
        ok(&self.write(collection, name, next, false))
    }

    async fn watch(&self, collection: Collection, q: &BTreeMap<String, String>) -> Response {
        let selector = q.get("labelSelector").cloned();
        let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
        let timeout = q
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map_or(Duration::from_secs(290), Duration::from_secs);
        let from: Option<u64> = q
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .filter(|v| *v > 0);
        let mut live = self.events.subscribe();
        let mut kick = self.kick.subscribe();
        let (backlog, head, gone) = {
            let mut inner = self.inner.lock().unwrap();
            let gone = from.is_some_and(|rv| rv <= inner.compacted);
            inner.gone += u64::from(gone);
            let backlog: Vec<WatchEvent> = match from {
                Some(rv) => inner
                    .history
                    .iter()
                    .filter(|e| e.rv > rv && e.collection == collection)
                    .cloned()
                    .collect(),
                None => inner
                    .objects
                    .get(&collection)
                    .map(|objs| {
                        objs.values()
                            .map(|o| WatchEvent {
                                rv: inner.rv,
                                collection: collection.clone(),
                                kind: "ADDED",
                                object: o.clone(),
                                previous: None,
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            (backlog, inner.rv, gone)
        };
        let server = self.clone();
        let (api_version, kind) = (
            collection
                .0
                .trim_start_matches("apis/")
                .trim_start_matches("api/")
                .to_owned(),
            kind_of(&collection.2),
        );
        let stream = async_stream::stream! {
            let line = |v: Value| Ok::<Bytes, std::io::Error>(Bytes::from(format!("{v}\n")));
            if gone {
                yield line(json!({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "too old resource version", "reason": "Expired", "code": 410}}));
                return;
            }
            let mut last = from.unwrap_or(0);
            for e in backlog {
                if let Some((kind, object)) = e.seen_by(selector.as_deref()) {
                    yield line(json!({"type": kind, "object": object}));
                }
                last = last.max(e.rv);
            }
            last = last.max(head);
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut tick = tokio::time::interval(server.bookmark_interval);
            tick.reset();
            loop {
                tokio::select! {
                    received = live.recv() => match received {
                        Ok(e) if e.rv > last && e.collection == collection => {
                            last = e.rv;
                            if let Some((kind, object)) = e.seen_by(selector.as_deref()) {
                                yield line(json!({"type": kind, "object": object}));
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    },
                    _ = tick.tick(), if bookmarks => {
                        let rv = server.inner.lock().unwrap().rv;
                        yield line(json!({"type": "BOOKMARK", "object": {
                            "apiVersion": api_version, "kind": kind,
                            "metadata": {"resourceVersion": rv.to_string()}}}));
                    }
                    _ = kick.changed() => return,
                    () = &mut deadline => return,
                }
            }
        };
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from_stream(stream))
            .unwrap()
    }
}

async fn handle(
    State(server): State<FakeApiServer>,
    method: Method,
    uri: Uri,
    Query(q): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // As on a real API server, a request once received takes effect even if
    // its client goes away meanwhile.
    tokio::spawn(handle_received(server, method, uri, q, headers, body))
        .await
        .unwrap_or_else(|e| status(500, "InternalError", &e.to_string()))
}

async fn handle_received(
    server: FakeApiServer,
    method: Method,
    uri: Uri,
    q: BTreeMap<String, String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let arrived = std::time::Instant::now();
    let user_agent = headers
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let response = match server.fault_for(&method, uri.path(), &headers) {
        Some(Answer::Hang) => {
            // Logged as it arrives (status 0): it never gets an answer.
            server.inner.lock().unwrap().log.push(Logged {
                method: method.to_string(),
                path: uri.path().to_owned(),
                query: uri.query().unwrap_or_default().to_owned(),
                content_type,
                status: 0,
                by_test: headers.contains_key("x-fake-actor"),
                at: std::time::Instant::now(),
                arrived,
                user_agent: user_agent.clone(),
            });
            return std::future::pending().await;
        }
        Some(Answer::Status(code)) => status(code, "Injected", "injected fault"),
        Some(Answer::Delay(by)) => {
            server.inner.lock().unwrap().delayed += 1;
            tokio::time::sleep(by).await;
            let r = serve(&server, &method, uri.path(), &q, &content_type, &body).await;
            server.inner.lock().unwrap().delayed -= 1;
            r
        }
        None => serve(&server, &method, uri.path(), &q, &content_type, &body).await,
    };
    server.inner.lock().unwrap().log.push(Logged {
        method: method.to_string(),
        path: uri.path().to_owned(),
        query: uri.query().unwrap_or_default().to_owned(),
        content_type,
        status: response.status().as_u16(),
        by_test: headers.contains_key("x-fake-actor"),
        at: std::time::Instant::now(),
        arrived,
        user_agent,
    });
    response
}

async fn serve(
    server: &FakeApiServer,
    method: &Method,
    path: &str,
    q: &BTreeMap<String, String>,
    content_type: &str,
    body: &[u8],
) -> Response {
    let Some((collection, name, sub)) = parse_path(path) else {
        return status(404, "NotFound", &format!("no route for {path}"));
    };
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return status(400, "BadRequest", &format!("body is not JSON: {e}")),
        }
    };
    let current = name
        .as_deref()
        .and_then(|n| server.get(&collection.0, &collection.1, &collection.2, n));
    let status_only = sub.as_deref() == Some("status");
    match (method.clone(), name.as_deref()) {
        (Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            server.watch(collection, q).await
        }
        (Method::GET, None) => {
            let inner = server.inner.lock().unwrap();
            let items: Vec<Value> = inner
                .objects
                .get(&collection)
                .map(|objs| {
                    objs.values()
                        .filter(|o| matches_labels(o, q.get("labelSelector").map(String::as_str)))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            ok(&json!({
                "apiVersion": collection.0.trim_start_matches("apis/").trim_start_matches("api/"),
                "kind": format!("{}List", kind_of(&collection.2)),
                "metadata": {"resourceVersion": inner.rv.to_string()},
                "items": items,
            }))
        }
        (Method::GET, Some(n)) => match current {
            Some(o) => ok(&o),
            None => status(404, "NotFound", &format!("{n} not found")),
        },
        (Method::POST, None) => server.create(&collection, body),
        (Method::PUT, Some(n)) => {
            let Some(current) = current else {
                return status(404, "NotFound", &format!("{n} not found"));
            };
            let sent_rv = body["metadata"]["resourceVersion"].as_str();
            if sent_rv.is_some_and(|rv| Some(rv) != current["metadata"]["resourceVersion"].as_str())
            {
                return status(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version",
                );
            }
            let next = if status_only {
                let mut next = current.clone();
                next["status"] = body["status"].clone();
                next
            } else {
                let mut next = body.clone();
                if has_status_subresource(&collection.2) {
                    next["status"] = current["status"].clone();
                }
                next
            };
            server.update(&collection, n, &current, next)
        }
        (Method::PATCH, Some(n)) => {
            let apply = content_type.starts_with("application/apply-patch");
            let merge = content_type.starts_with("application/merge-patch")
                || content_type.starts_with("application/strategic-merge-patch");
            if !apply && !merge {
                return status(415, "UnsupportedMediaType", content_type);
            }
            if apply && q.get("fieldManager").is_none_or(String::is_empty) {
                return status(422, "Invalid", "fieldManager is required for apply patch");
            }
            let mut patch = body.clone();
            if let Some(p) = patch.as_object_mut() {
                p.remove("apiVersion");
                p.remove("kind");
                if status_only {
                    p.retain(|k, _| k == "status");
                } else if has_status_subresource(&collection.2) {
                    p.remove("status");
                }
            }
            let manager = q
                .get("fieldManager")
                .cloned()
                .unwrap_or_else(|| "unknown".to_owned());
            let mut applied = std::collections::BTreeSet::new();
            leaves(&patch, "", &mut applied);
            let key = (collection.clone(), n.to_owned());
            match current {
                Some(current) => {
                    let mut next = current.clone();
                    merge_patch(&mut next, &patch);
                    {
                        let mut inner = server.inner.lock().unwrap();
                        let managers = inner.managed.entry(key).or_default();
                        let in_scope = |p: &String| p.starts_with("/status") == status_only;
                        if apply {
                            // Fields this manager applied before and not now go,
                            // unless someone else owns them too.
                            let before: Vec<String> = managers
                                .get(&manager)
                                .map(|m| m.iter().filter(|p| in_scope(p)).cloned().collect())
                                .unwrap_or_default();
                            for p in before.iter().filter(|p| !applied.contains(*p)) {
                                let shared = managers.iter().any(|(m, owned)| {
                                    *m != manager && owned.iter().any(|o| overlaps(o, p))
                                });
                                if !shared {
                                    remove_at(&mut next, p);
                                }
                            }
                            let mine = managers.entry(manager.clone()).or_default();
                            mine.retain(|p| !in_scope(p));
                        }
                        // What was written is the writer's (forcefully taken from others).
                        for (m, owned) in managers.iter_mut() {
                            if *m != manager {
                                owned.retain(|o| !applied.iter().any(|a| overlaps(a, o)));
                            }
                        }
                        managers.entry(manager.clone()).or_default().extend(applied);
                    }
                    server.update(&collection, n, &current, next)
                }
                None if apply && !status_only => {
                    server
                        .inner
                        .lock()
                        .unwrap()
                        .managed
                        .insert(key, Managers::from([(manager, applied)]));
                    let mut object = body.clone();
                    if has_status_subresource(&collection.2) {
                        object.as_object_mut().map(|o| o.remove("status"));
                    }
                    object["metadata"]["name"] = n.into();
                    server.create(&collection, object)
                }
                None => status(404, "NotFound", &format!("{n} not found")),
            }
        }
        (Method::DELETE, Some(n)) => {
            let mut inner = server.inner.lock().unwrap();
            let removed = inner
                .objects
                .get_mut(&collection)
                .and_then(|objs| objs.remove(n));
            inner.managed.remove(&(collection.clone(), n.to_owned()));
            match removed {
                Some(mut o) => {
                    inner.rv += 1;
                    o["metadata"]["resourceVersion"] = inner.rv.to_string().into();
                    server.emit(&mut inner, &collection, "DELETED", o, None);
                    ok(
                        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200}),
                    )
                }
                None => status(404, "NotFound", &format!("{n} not found")),
            }
        }
        _ => status(405, "MethodNotAllowed", &format!("{method} {path}")),
    }
}
