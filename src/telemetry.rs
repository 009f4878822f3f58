//! Logs (tracing, text or JSON), spans (optionally exported over OTLP) and
//! Prometheus metrics.
//!
//! Every HTTP request runs in a `request` span carrying its method, route
//! template, request id, status and latency (`api::trace`); the store's
//! transactions, the create writer's batches, the hub's fan-out, failover
//! batches and the mirror's writes have spans of their own. A JSON log line
//! carries the fields of the span it was emitted in (`span`) and of every
//! span around it (`spans`, outermost first), so a request's id is on every
//! line it caused. Work a request hands to another task (the create writer)
//! names the requests it serves in its own span ([`crate::request_id`]).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use chrono::{DateTime, Utc};

use crate::domain::events::StreamEvent;
use crate::domain::{RouteStatus, WorkerStatus};
use crate::store::{Counts, Store};

/// The log filter unless `RUST_LOG` sets one: `info`, without kube-client's
/// per-request trace layer, which logs every failed attempt (each retried
/// 503 too) at ERROR with the whole response. The coordinator logs its own
/// failed calls, once, at WARN (and repeats at DEBUG).
pub const DEFAULT_LOG_FILTER: &str = "info,kube_client::client::builder=off";

/// The service name spans are exported under.
pub const SERVICE_NAME: &str = "appproxy-coordinator";

/// Keeps the OTLP exporter (if any) running; [`Telemetry::shutdown`] sends
/// the spans still queued.
#[must_use = "dropping it keeps queued spans from being exported at exit"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still queued and stops the exporter (at most a few
    /// seconds: the exporter's own timeout bounds it). Blocking; call it
    /// outside the async runtime's worker threads or via `spawn_blocking`.
    pub fn shutdown(self) {
        if let Some(Err(e)) = self.provider.map(|p| p.shutdown()) {
            tracing::warn!(error = %e, "cannot export the last spans");
        }
    }
}

/// Installs the global tracing subscriber: log lines on stderr (JSON lines
/// with the span fields when `json`), filtered by `RUST_LOG` (default
/// [`DEFAULT_LOG_FILTER`]); with `otlp_endpoint`, spans are also exported
/// there (OTLP over HTTP/protobuf, to `<endpoint>/v1/traces`).
pub fn init_tracing(json: bool, otlp_endpoint: Option<&str>) -> anyhow::Result<Telemetry> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (otel, provider) = match otlp_endpoint {
        Some(endpoint) => {
            let provider = otlp_provider(endpoint)?;
            let tracer = provider.tracer(SERVICE_NAME);
            // Not the HTTP client's own spans: exporting them would make
            // spans of every export.
            let exported = tracing_subscriber::filter::filter_fn(|meta| {
                !["hyper", "h2", "reqwest"]
                    .iter()
                    .any(|c| meta.target().starts_with(c))
            });
            (
                Some(
                    tracing_opentelemetry::layer()
                        .with_tracer(tracer)
                        .with_filter(exported),
                ),
                Some(provider),
            )
        }
        None => (None, None),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(json.then(|| json_layer(std::io::stderr)))
        .with((!json).then(|| {
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi)
        }))
        .with(otel)
        .try_init();
    Ok(Telemetry { provider })
}

/// JSON lines to `writer`: the event's fields at the top level, the fields
/// of the span it was emitted in under `span`, and those of every span
/// around it under `spans` (outermost first).
pub fn json_layer<S, W>(writer: W) -> impl Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(true)
        .with_writer(writer)
}

/// The OTLP trace endpoint for a collector at `endpoint`: the OTLP/HTTP
/// path `/v1/traces` appended, unless it is there already.
pub fn otlp_traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

/// A tracer provider exporting in batches to the collector at `endpoint`.
fn otlp_provider(endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let url = otlp_traces_url(endpoint);
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url.clone())
        .with_timeout(Duration::from_secs(5))
        .build()
        .with_context(|| format!("cannot export spans to {url}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(SERVICE_NAME)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    /// The route template (`/routes/{id}`), never the raw path.
    pub path: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLatencyLabels {
    pub method: String,
    pub path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum StatusLabel {
    Pending,
    Propagating,
    Active,
    FailingOver,
    Ready,
    NotReady,
    Lost,
    Draining,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: StatusLabel,
}

impl From<RouteStatus> for StatusLabel {
    fn from(s: RouteStatus) -> StatusLabel {
        match s {
            RouteStatus::Pending => StatusLabel::Pending,
            RouteStatus::Propagating => StatusLabel::Propagating,
            RouteStatus::Active => StatusLabel::Active,
            RouteStatus::FailingOver => StatusLabel::FailingOver,
        }
    }
}

impl From<WorkerStatus> for StatusLabel {
    fn from(s: WorkerStatus) -> StatusLabel {
        match s {
            WorkerStatus::Ready => StatusLabel::Ready,
            WorkerStatus::NotReady => StatusLabel::NotReady,
            WorkerStatus::Lost => StatusLabel::Lost,
            WorkerStatus::Draining => StatusLabel::Draining,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResentLabels {
    pub event: &'static str,
    pub why: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// A refused credential: which API, and whether it was only refused or the
/// address is now (or still) over its limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthFailureLabels {
    /// `native` or `backendai`.
    pub api: &'static str,
    /// `refused` (401) or `limited` (429).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker: String,
}

/// Every metric the coordinator exports.
pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_latency: Family<HttpLatencyLabels, Histogram>,
    pub routes: Family<StatusLabels, Gauge>,
    pub workers: Family<StatusLabels, Gauge>,
    pub open_streams: Gauge,
    /// Streams that re-read the change log because they fell behind.
    pub stream_resyncs: Counter,
    pub events_sent: Family<EventLabels, Counter>,
    pub fanout_latency: Histogram,
    pub ack_lag: Family<WorkerLabels, Gauge>,
    pub failovers: Family<OutcomeLabels, Counter>,
    pub failover_seconds: Histogram,
    pub expired: Counter,
    pub stranded: Gauge,
    /// Backend.AI bus events published, by event name.
    pub backendai_events: Family<EventLabels, Counter>,
    /// Created events published again for want of an acknowledgement.
    pub backendai_republished: Counter,
    /// Bus events sent again, by event and why (ack_wait, after_change, sweep).
    pub backendai_resent: Family<ResentLabels, Counter>,
    /// Idle interactive Backend.AI circuits collected.
    pub backendai_idle_collected: Counter,
    /// `session_terminated` entries of the Manager's core bus handled
    /// (their deletion committed and the entry acknowledged).
    pub backendai_sessions_terminated: Counter,
    /// Interactive circuits deleted because their session ended.
    pub backendai_session_circuits_removed: Counter,
    /// Refused credentials and requests refused for too many of them.
    pub auth_failures: Family<AuthFailureLabels, Counter>,
}

impl Metrics {
    /// The coordinator's metrics, with those `store` keeps itself.
    pub fn new(store: &Store) -> Arc<Metrics> {
        let metrics = Metrics {
            registry: Registry::with_prefix("appproxy"),
            http_requests: Family::default(),
            http_latency: Family::new_with_constructor(|| {
                Histogram::new([
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ])
            }),
            routes: Family::default(),
            workers: Family::default(),
            open_streams: Gauge::default(),
            stream_resyncs: Counter::default(),
            events_sent: Family::default(),
            fanout_latency: Histogram::new([
                0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0,
            ]),
            ack_lag: Family::default(),
            failovers: Family::default(),
            failover_seconds: Histogram::new([
                1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0,
            ]),
            expired: Counter::default(),
            stranded: Gauge::default(),
            backendai_events: Family::default(),
            backendai_republished: Counter::default(),
            backendai_resent: Family::default(),
            backendai_idle_collected: Counter::default(),
            backendai_sessions_terminated: Counter::default(),
            backendai_session_circuits_removed: Counter::default(),
            auth_failures: Family::default(),
        };
        Arc::new(metrics.registered(store))
    }

    /// Registers every metric (and the store's own) with its name and help.
    fn registered(mut self, store: &Store) -> Metrics {
        /// `registry.register(name, help, metric.clone())` for each line.
        macro_rules! register {
            ($registry:expr; $($name:literal, $help:expr => $metric:expr;)*) => {
                $( $registry.register($name, $help, $metric.clone()); )*
            };
        }
        register! { self.registry;
            "create_batch_size", "Route creates committed together in one transaction by the create writer"
                => store.create_batch_sizes();
            "create_forwards", "Route creates this replica sent to the leader's create writer, by \
                outcome: answered by the leader, not_sent (the leader could not be reached or \
                refused them: committed here), unknown (no answer: committed here, after reading \
                which the leader had created)" => store.create_forwards();
            "worker_token_reads", "Per-worker token hashes read from the database (the rest come \
                from a short-lived cache)" => store.token_reads();
            "http_requests", "HTTP requests answered, by method, route template and status"
                => self.http_requests;
            "http_request_duration_seconds", "Time to answer HTTP requests (to the first byte of \
                streams)" => self.http_latency;
            "routes", "Routes by status" => self.routes;
            "workers", "Workers by status" => self.workers;
            "open_streams", "Watch streams currently open (workers and managers)" => self.open_streams;
            "stream_resyncs", "Times a watch stream re-read the change log because it fell behind \
                (its queue of batches filled up, or the log was compacted under the hub)"
                => self.stream_resyncs;
            "stream_events_sent", "Events sent on watch streams, by event" => self.events_sent;
            "fanout_latency_seconds", "From a change's transaction to its event leaving on a stream"
                => self.fanout_latency;
            "worker_ack_lag_revisions", "Current revision minus the revision a worker last \
                acknowledged" => self.ack_lag;
            "failover_routes", "Routes moved off lost or removed workers (moved), left pending, \
                placed from pending, or kept on a lost worker because a move would change a \
                Backend.AI URL (stranded)" => self.failovers;
            "failover_seconds", "From a lost worker's last heartbeat to its route being placed \
                elsewhere" => self.failover_seconds;
            "expired_routes", "Routes collected after expires_at" => self.expired;
            "stranded_routes", "Backend.AI circuits staying on their lost worker because a move \
                would change their URL" => self.stranded;
            "backendai_bus_events", "Events published on the Backend.AI event bus (Redis), by event"
                => self.backendai_events;
            "backendai_bus_republished", "Backend.AI created events published again because no \
                worker acknowledged them in time" => self.backendai_republished;
            "backendai_bus_resent", "Backend.AI bus events sent again, by event and why: a created \
                event not yet acknowledged (ack_wait), a route-updated or removed event in the \
                seconds after its change (after_change), the anti-entropy sweep (sweep)"
                => self.backendai_resent;
            "backendai_idle_collected", "Interactive Backend.AI circuits deleted after going unused \
                for the idle timeout" => self.backendai_idle_collected;
            "backendai_sessions_terminated", "session_terminated events of the Backend.AI Manager's \
                core bus handled (the session's circuits deleted, the entry acknowledged)"
                => self.backendai_sessions_terminated;
            "backendai_session_circuits_removed", "Interactive Backend.AI circuits deleted because \
                their session ended (session_terminated)" => self.backendai_session_circuits_removed;
            "auth_failures", "Requests whose credentials were refused (outcome=refused, 401) and \
                requests refused because their address failed too often (outcome=limited, 429), by \
                API" => self.auth_failures;
        }
        self
    }

    /// Sets the by-status gauges from a fresh count.
    pub fn observe_counts(&self, counts: &Counts) {
        for s in RouteStatus::ALL {
            let n = counts.routes.get(&s).copied().unwrap_or(0);
            self.routes
                .get_or_create(&StatusLabels { status: s.into() })
                .set(n);
        }
        for s in WorkerStatus::ALL {
            let n = counts.workers.get(&s).copied().unwrap_or(0);
            self.workers
                .get_or_create(&StatusLabels { status: s.into() })
                .set(n);
        }
        self.stranded.set(counts.stranded);
    }

    /// Counts an event sent on a stream; `committed` times live changes.
    pub fn sent(&self, event: &StreamEvent, committed: Option<DateTime<Utc>>) {
        self.events_sent
            .get_or_create(&EventLabels {
                event: event.name(),
            })
            .inc();
        if let Some(at) = committed {
            let secs = (Utc::now() - at).num_microseconds().unwrap_or(0) as f64 / 1e6;
            self.fanout_latency.observe(secs.max(0.0));
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_default_filter_keeps_kube_client_retries_out_of_the_error_log() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new(DEFAULT_LOG_FILTER))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "kube_client::client::builder", "failed with status 503");
            tracing::warn!(target: "appproxy_coordinator::k8s::mirror", "cannot write");
            tracing::debug!(target: "appproxy_coordinator::leader", "still failing");
        });
        let logged = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert!(!logged.contains("failed with status"), "{logged}");
        assert!(logged.contains("cannot write"), "{logged}");
        assert!(!logged.contains("still failing"), "{logged}");
    }

    #[test]
    fn json_lines_carry_the_fields_of_their_spans() {
        use tracing_subscriber::layer::SubscriberExt;
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::registry().with(json_layer(move || writer.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let request = tracing::info_span!(
                "request",
                request_id = "abc-123",
                status = tracing::field::Empty
            );
            let _request = request.enter();
            let batch = tracing::info_span!("create_batch", size = 2);
            batch.in_scope(|| tracing::info!(revision = 7, "inside"));
            request.record("status", 201);
            tracing::info!("answered");
        });
        let logged = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = logged
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{logged}");
        let inside = &lines[0];
        assert_eq!(inside["message"], "inside", "{logged}");
        assert_eq!(inside["revision"], 7, "event fields at the top: {logged}");
        assert_eq!(inside["span"]["name"], "create_batch", "{logged}");
        assert_eq!(inside["span"]["size"], 2, "{logged}");
        assert_eq!(inside["spans"][0]["request_id"], "abc-123", "{logged}");
        assert_eq!(inside["spans"][1]["name"], "create_batch", "{logged}");
        assert_eq!(lines[1]["span"]["request_id"], "abc-123", "{logged}");
        assert_eq!(lines[1]["span"]["status"], 201, "recorded later: {logged}");
    }

    #[test]
    fn the_otlp_path_is_appended_once() {
        assert_eq!(
            otlp_traces_url("http://collector:4318"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            otlp_traces_url("http://collector:4318/"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            otlp_traces_url("https://c.example/otlp/v1/traces"),
            "https://c.example/otlp/v1/traces"
        );
    }
}
