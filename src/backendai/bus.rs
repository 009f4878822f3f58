//! The Backend.AI event bus: what Backend.AI workers learn over Redis pub/sub
//! (`events_all-appproxy`) instead of a watch stream.
//!
//! **Where publishing is decided.** Not in request handlers: the leader's
//! publisher ([`super::publish`]) follows the change log, like the hub follows
//! it for watch streams, and [`plan`] turns each route change into the events
//! a Backend.AI worker understands: a route newly on a Backend.AI worker is
//! `appproxy_circuit_created_event`, a changed route staying on its worker is
//! `appproxy_circuit_route_updated_event`, a route deleted or moved away is
//! `appproxy_circuit_removed_event` on the worker that held it. Following the
//! log means every change is published exactly as committed, whoever made it
//! (the `/v2` API, the native API, failover, draining, expiry, idle
//! collection), once (only the leader publishes), in commit order, and after a
//! restart or a change of leader from where the last publisher stopped (its
//! position is stored with the circuits it published).
//!
//! **Acknowledgements.** Every replica subscribes ([`listen`]): an
//! `appproxy_worker_circuit_added_event` is passed to
//! [`super::Acks::heard`] (request handlers on that replica wait on it) and to
//! the publisher, which, on the leader, records it so the route's status
//! becomes `Active`.
//!
//! **Why re-publish.** Pub/sub delivers at most once: a created event a worker
//! missed (restarting, disconnected, Redis failing over) would leave it
//! without the circuit until its next restart (it has no resync). So the
//! publisher publishes a created event again until the worker acknowledges it,
//! soon (half a second) and then with a capped, jittered exponential backoff;
//! the worker overwrites idempotently. Route-updated and removed events have
//! no acknowledgement: each is sent again a few times in the seconds after its
//! change, and an anti-entropy sweep sends every circuit's state and every
//! recent removal again once per [`BusConfig::sweep_period`]
//! ([`super::publish`]'s `resend`).
//!
//! [`spawn`] starts the listener on every replica and the publisher and idle
//! collection ([`super::idle`]) on the leader. Redis being down never stops
//! the coordinator: each loop reconnects with a backoff and says so in the log
//! (without the Redis URL's password).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use super::BackendAi;
use crate::leader::{Context, stopped};
use crate::store::BusCircuit;

/// The pub/sub channel of every circuit event, both ways.
pub const CHANNEL: &str = "events_all-appproxy";
/// Our `source`.
pub const SOURCE: &str = "appproxy-coordinator";
/// The metadata upstream sends when nothing is set (a JSON string inside the
/// envelope): [`Metadata::default`] as written.
pub const METADATA: &str =
    r#"{"request_id":null,"user":null,"triggered_user":null,"traceparent":null}"#;

/// The metadata upstream sends (a JSON string inside the envelope), with
/// `traceparent` set when the event is part of a trace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    #[serde(default)]
    pub request_id: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub triggered_user: Option<String>,
    #[serde(default)]
    pub traceparent: Option<String>,
}
pub const CREATED: &str = "appproxy_circuit_created_event";
pub const ROUTE_UPDATED: &str = "appproxy_circuit_route_updated_event";
pub const REMOVED: &str = "appproxy_circuit_removed_event";
/// A worker's acknowledgement of a created event.
pub const ADDED: &str = "appproxy_worker_circuit_added_event";

/// A pub/sub message: `payload` and `metadata` are JSON *strings*.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub name: String,
    pub source: String,
    pub payload: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<String>,
}

impl Envelope {
    /// Our envelope around `payload`.
    pub fn new(name: &str, payload: &Value) -> Envelope {
        Envelope::traced(name, payload, None)
    }

    /// Our envelope around `payload`, in the trace `traceparent` names.
    pub fn traced(name: &str, payload: &Value, traceparent: Option<String>) -> Envelope {
        let metadata = Metadata {
            traceparent,
            ..Metadata::default()
        };
        Envelope {
            name: name.to_owned(),
            source: SOURCE.to_owned(),
            payload: payload.to_string(),
            metadata: Some(serde_json::to_string(&metadata).expect("metadata serialises")),
        }
    }

    /// The trace the sender was in, if its metadata says one.
    pub fn traceparent(&self) -> Option<String> {
        let metadata: Metadata = serde_json::from_str(self.metadata.as_deref()?).ok()?;
        metadata.traceparent
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("envelopes serialise")
    }
}

/// The body of created, removed and added events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CircuitsPayload {
    pub target_worker_authority: String,
    pub circuits: Vec<Value>,
}

/// One event to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub name: &'static str,
    pub authority: String,
    pub payload: Value,
}

impl Event {
    pub fn created(authority: &str, circuit: &Value) -> Event {
        Event {
            name: CREATED,
            authority: authority.to_owned(),
            payload: serde_json::json!({
                "target_worker_authority": authority, "circuits": [circuit]
            }),
        }
    }

    pub fn removed(authority: &str, circuit: &Value) -> Event {
        Event {
            name: REMOVED,
            authority: authority.to_owned(),
            payload: serde_json::json!({
                "target_worker_authority": authority, "circuits": [circuit]
            }),
        }
    }

    pub fn route_updated(authority: &str, circuit: &Value) -> Event {
        let routes = circuit
            .get("route_info")
            .cloned()
            .unwrap_or(Value::Array(Vec::new()));
        Event {
            name: ROUTE_UPDATED,
            authority: authority.to_owned(),
            payload: serde_json::json!({
                "target_worker_authority": authority, "circuit": circuit, "routes": routes
            }),
        }
    }

    pub fn envelope(&self) -> Envelope {
        Envelope::new(self.name, &self.payload)
    }

    /// Its envelope in the trace `traceparent` names.
    pub fn envelope_traced(&self, traceparent: Option<String>) -> Envelope {
        Envelope::traced(self.name, &self.payload, traceparent)
    }
}

/// Where a circuit sits on its worker: Backend.AI workers apply created and
/// removed events by port or subdomain.
pub(crate) fn slot(circuit: &Value) -> (Option<&Value>, Option<&Value>, Option<&Value>) {
    (
        circuit.get("worker"),
        circuit.get("port"),
        circuit.get("subdomain"),
    )
}

/// The circuit without the fields that change on every write and that no
/// worker acts on.
fn served(circuit: &Value) -> Value {
    let mut c = circuit.clone();
    if let Some(o) = c.as_object_mut() {
        o.remove("updated_at");
    }
    c
}

/// The circuit a route now has on a Backend.AI worker.
#[derive(Clone, Debug, PartialEq)]
pub struct Placed {
    pub worker_id: Uuid,
    pub authority: String,
    pub circuit: Value,
}

/// The events that take a Backend.AI worker from `old` (what it was last
/// told about a route) to `new` (where the route is now, if on a Backend.AI
/// worker), in order: a removal always comes before a creation, so the slot
/// it frees is never taken away from the new circuit.
pub fn plan(old: Option<&BusCircuit>, new: Option<&Placed>) -> Vec<Event> {
    match (old, new) {
        (None, None) => Vec::new(),
        (None, Some(n)) => vec![Event::created(&n.authority, &n.circuit)],
        (Some(o), None) => vec![Event::removed(&o.authority, &o.circuit)],
        (Some(o), Some(n)) => {
            if o.worker_id != n.worker_id || slot(&o.circuit) != slot(&n.circuit) {
                vec![
                    Event::removed(&o.authority, &o.circuit),
                    Event::created(&n.authority, &n.circuit),
                ]
            } else if served(&o.circuit) != served(&n.circuit) {
                vec![Event::route_updated(&n.authority, &n.circuit)]
            } else {
                Vec::new()
            }
        }
    }
}

/// A circuit a worker acknowledged, as its `added` event names it.
#[derive(Clone, Debug, PartialEq)]
pub struct Ack {
    pub circuit: Value,
}

impl Ack {
    pub fn id(&self) -> Option<Uuid> {
        self.circuit.get("id")?.as_str()?.parse().ok()
    }

    /// It acknowledges `published` (same circuit, worker and slot).
    pub fn matches(&self, published: &BusCircuit) -> bool {
        self.id() == Some(published.route_id) && slot(&self.circuit) == slot(&published.circuit)
    }
}

/// An `added` event heard on the channel.
#[derive(Clone, Debug, PartialEq)]
pub struct Acked {
    pub authority: String,
    pub acks: Vec<Ack>,
    /// The trace the worker was in when it sent it.
    pub traceparent: Option<String>,
}

/// The acknowledged circuits in a message heard on the channel, if it is an
/// `added` event.
pub fn parse_ack(message: &str) -> Option<Acked> {
    let envelope: Envelope = serde_json::from_str(message).ok()?;
    if envelope.name != ADDED {
        return None;
    }
    let payload: CircuitsPayload = serde_json::from_str(&envelope.payload).ok()?;
    Some(Acked {
        traceparent: envelope.traceparent(),
        authority: payload.target_worker_authority,
        acks: payload
            .circuits
            .into_iter()
            .map(|circuit| Ack { circuit })
            .collect(),
    })
}

/// How the bus loops pace themselves.
#[derive(Clone, Debug)]
pub struct BusConfig {
    /// How often the publisher looks for changes other replicas committed
    /// (its own are seen at once) and for re-sends that are due.
    pub poll_interval: Duration,
    /// Change-log rows read at a time.
    pub batch: u32,
    /// The first re-publish of an unacknowledged created event comes this
    /// long after it (well inside the ack wait); the waits then double, up to
    /// [`Self::max_backoff`], each jittered by up to a quarter.
    pub first_republish: Duration,
    /// The longest wait between two re-publishes of an unacknowledged
    /// created event.
    pub max_backoff: Duration,
    /// Route-updated and removed events have no acknowledgement: each is
    /// sent again this long after its change, once per entry (so a worker
    /// whose subscriber was away for a few seconds hears it).
    pub resend_after: Vec<Duration>,
    /// The anti-entropy sweep sends every live circuit's state and every
    /// removal of the last two periods again once per period, spread evenly.
    pub sweep_period: Duration,
    /// At most this many sweep events a second.
    pub sweep_rate: u32,
    /// How often idle interactive circuits are looked for.
    pub idle_interval: Duration,
    /// Redis commands and connections give up after this long.
    pub redis_timeout: Duration,
}

impl Default for BusConfig {
    fn default() -> BusConfig {
        BusConfig {
            poll_interval: Duration::from_millis(500),
            batch: 500,
            first_republish: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            resend_after: [1, 3, 7].map(Duration::from_secs).to_vec(),
            sweep_period: Duration::from_secs(300),
            sweep_rate: 200,
            idle_interval: Duration::from_secs(10),
            redis_timeout: Duration::from_secs(5),
        }
    }
}

/// Starts the bus: the acknowledgement listener on this replica, the
/// publisher and idle collection while `ctx.leadership` holds; all stop when
/// `ctx.shutdown` turns true. The handle finishes once they have.
pub fn spawn(
    ctx: Context,
    backendai: Arc<BackendAi>,
    config: BusConfig,
) -> tokio::task::JoinHandle<()> {
    let (acks_tx, acks_rx) = mpsc::channel(4096);
    let listener = tokio::spawn(listen(
        backendai.clone(),
        acks_tx,
        config.clone(),
        ctx.shutdown.clone(),
    ));
    let publisher = tokio::spawn(super::publish::run(
        ctx.clone(),
        backendai.clone(),
        config.clone(),
        acks_rx,
    ));
    let idle = tokio::spawn(super::idle::run(ctx, backendai, config));
    tokio::spawn(async move {
        let _ = tokio::join!(listener, publisher, idle);
    })
}

/// Reconnection backoff of one loop, logging a lasting outage once.
pub(crate) struct Reconnect {
    what: &'static str,
    failures: u32,
}

impl Reconnect {
    pub(crate) fn new(what: &'static str) -> Reconnect {
        Reconnect { what, failures: 0 }
    }

    /// Notes a failure; answers how long to wait before trying again.
    pub(crate) fn failed(&mut self, error: &dyn std::fmt::Display, url: &str) -> Duration {
        self.failures += 1;
        let redis = crate::secret::redacted_url(url);
        if self.failures == 1 {
            tracing::warn!(%error, %redis, "Backend.AI bus: {} cannot use Redis; retrying", self.what);
        } else {
            tracing::debug!(%error, failures = self.failures, "Backend.AI bus: {} still cannot use Redis", self.what);
        }
        let exp = self.failures.min(6);
        Duration::from_millis(100 << exp).min(Duration::from_secs(5))
    }

    pub(crate) fn succeeded(&mut self) {
        if self.failures > 0 {
            tracing::info!("Backend.AI bus: {} reached Redis again", self.what);
        }
        self.failures = 0;
    }
}

/// Opens a connection for commands on `target` (its database; through the
/// sentinels with Sentinel, so a reconnection after a failover reaches the
/// new primary).
pub(crate) async fn connect(
    target: &super::RedisTarget,
    timeout: Duration,
) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    target.connect(&config, timeout).await
}

/// Hears acknowledgements on every replica until `shutdown`: passes their
/// circuit ids to [`BackendAi::acks`] and the acknowledgements to the
/// publisher (which records them while leading).
async fn listen(
    backendai: Arc<BackendAi>,
    to_publisher: mpsc::Sender<Vec<Ack>>,
    config: BusConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let url = backendai.settings.redis_url.clone();
    let mut reconnect = Reconnect::new("the acknowledgement listener");
    loop {
        let subscribed = async {
            // Through the sentinels with Sentinel: after a failover (which
            // closes this connection) the subscription moves to the new
            // primary.
            let mut pubsub = backendai.redis.pubsub(config.redis_timeout).await?;
            pubsub.subscribe(CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            r = subscribed => r,
            () = stopped(&mut shutdown) => return,
        };
        let pubsub = match pubsub {
            Ok(p) => p,
            Err(e) => {
                let wait = reconnect.failed(&super::redis_error(&e), &url);
                tokio::select! {
                    () = tokio::time::sleep(wait) => continue,
                    () = stopped(&mut shutdown) => return,
                }
            }
        };
        reconnect.succeeded();
        let mut messages = pubsub.into_on_message();
        loop {
            let message = tokio::select! {
                m = messages.next() => m,
                () = stopped(&mut shutdown) => return,
            };
            let Some(message) = message else {
                break; // the connection closed: subscribe again
            };
            let Ok(text) = message.get_payload::<String>() else {
                continue;
            };
            let Some(Acked {
                authority,
                acks,
                traceparent,
            }) = parse_ack(&text)
            else {
                continue;
            };
            // Part of the worker's trace when it said which.
            let span = tracing::info_span!(
                "circuits_acknowledged",
                worker = %authority,
                circuits = acks.len(),
                "otel.kind" = "consumer",
            );
            crate::trace_context::adopt(&span, traceparent.as_deref());
            span.in_scope(|| {
                tracing::debug!("Backend.AI bus: a worker acknowledged circuits");
                backendai
                    .acks
                    .heard(acks.iter().filter_map(Ack::id).collect());
            });
            // A full queue means the publisher is not reading (not leading,
            // or stuck on the database): it re-publishes what stays unacked.
            let _ = to_publisher.try_send(acks);
        }
        let wait = reconnect.failed(&"the subscription ended", &url);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stopped(&mut shutdown) => return,
        }
    }
}

/// Publishes `event`'s envelope on [`CHANNEL`], in the trace `traceparent`
/// names.
pub(crate) async fn publish(
    conn: &mut redis::aio::MultiplexedConnection,
    event: &Event,
    traceparent: Option<String>,
) -> redis::RedisResult<()> {
    let _receivers: i64 = redis::cmd("PUBLISH")
        .arg(CHANNEL)
        .arg(event.envelope_traced(traceparent).to_json())
        .query_async(conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn published(worker: Uuid, port: u16, app: &str) -> BusCircuit {
        BusCircuit {
            route_id: Uuid::nil(),
            worker_id: worker,
            authority: "w1".into(),
            circuit: json!({"id": Uuid::nil(), "worker": worker, "port": port, "subdomain": null,
                "app": app, "route_info": [], "updated_at": "x"}),
            revision: 3,
            acked: false,
        }
    }

    fn placed(worker: Uuid, authority: &str, port: u16, app: &str) -> Placed {
        Placed {
            worker_id: worker,
            authority: authority.into(),
            circuit: json!({"id": Uuid::nil(), "worker": worker, "port": port, "subdomain": null,
                "app": app, "route_info": [{"kernel_port": 1}], "updated_at": "y"}),
        }
    }

    #[test]
    fn each_change_becomes_the_events_a_worker_needs() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let old = published(a, 10205, "app");
        let names = |events: Vec<Event>| {
            events
                .iter()
                .map(|e| (e.name, e.authority.clone()))
                .collect::<Vec<_>>()
        };
        assert!(plan(None, None).is_empty());
        assert_eq!(
            names(plan(None, Some(&placed(a, "w1", 10205, "app")))),
            [(CREATED, "w1".into())]
        );
        assert_eq!(names(plan(Some(&old), None)), [(REMOVED, "w1".into())]);
        assert_eq!(
            names(plan(Some(&old), Some(&placed(b, "w2", 10205, "app")))),
            [(REMOVED, "w1".into()), (CREATED, "w2".into())]
        );
        assert_eq!(
            names(plan(Some(&old), Some(&placed(a, "w1", 10206, "app")))),
            [(REMOVED, "w1".into()), (CREATED, "w1".into())]
        );
        let updated = plan(Some(&old), Some(&placed(a, "w1", 10205, "app")));
        assert_eq!(names(updated.clone()), [(ROUTE_UPDATED, "w1".into())]);
        assert_eq!(updated[0].payload["routes"], json!([{"kernel_port": 1}]));
        // Only updated_at differs: nothing the worker acts on.
        let mut same = old.clone();
        same.circuit["updated_at"] = json!("z");
        let unchanged = Placed {
            worker_id: a,
            authority: "w1".into(),
            circuit: same.circuit.clone(),
        };
        assert!(plan(Some(&old), Some(&unchanged)).is_empty());
    }

    #[test]
    fn envelopes_carry_the_payload_and_metadata_as_json_strings() {
        let e = Event::created("w1", &json!({"id": 1}));
        let wire: Value = serde_json::from_str(&e.envelope().to_json()).unwrap();
        assert_eq!(wire["name"], CREATED);
        assert_eq!(wire["source"], SOURCE);
        let payload: Value = serde_json::from_str(wire["payload"].as_str().unwrap()).unwrap();
        assert_eq!(
            payload,
            json!({"target_worker_authority": "w1", "circuits": [{"id": 1}]})
        );
        assert_eq!(wire["metadata"], METADATA);
        let t = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let traced = e.envelope_traced(Some(t.into()));
        let wire: Value = serde_json::from_str(&traced.to_json()).unwrap();
        let metadata: Value = serde_json::from_str(wire["metadata"].as_str().unwrap()).unwrap();
        assert_eq!(metadata["traceparent"], t);
        assert_eq!(traced.traceparent().as_deref(), Some(t));
    }

    #[test]
    fn only_added_events_are_acknowledgements() {
        let worker = Uuid::new_v4();
        let circuit = published(worker, 10205, "app");
        let added = Envelope::new(
            ADDED,
            &json!({"target_worker_authority": "w1", "circuits": [circuit.circuit]}),
        );
        let acked = parse_ack(&added.to_json()).unwrap();
        assert_eq!(acked.authority, "w1");
        assert_eq!(acked.traceparent, None);
        let acks = acked.acks;
        assert_eq!(acks[0].id(), Some(Uuid::nil()));
        assert!(acks[0].matches(&circuit));
        assert!(!acks[0].matches(&published(worker, 10206, "app")));
        let created = Event::created("w1", &circuit.circuit).envelope();
        assert!(parse_ack(&created.to_json()).is_none());
        assert!(parse_ack("not json").is_none());
    }
}
