//! appproxy-coordinator: the control plane of an application proxy.
//!
//! The pure core, then the modules around it; arrows point one way (each
//! module uses only those listed before it, plus the leaf modules).
//!
//! - [`domain`]: routes, workers, validation, placement, failover and health
//!   rules, the change events. No I/O; unit-tested directly.
//! - [`secret`], [`wire`], [`clock`], [`tls`]: leaf modules: secrets and the
//!   shared bearer tokens; the shapes a worker and the coordinator exchange;
//!   the time of day every time-based decision reads (the system clock in
//!   production, a manual one in tests); what a failed TLS handshake to
//!   PostgreSQL or Redis means; [`request_id`] and [`trace_context`]: the
//!   request id and the W3C trace context a task's work carries.
//! - [`store`]: PostgreSQL and embedded SQLite persistence, with the change
//!   log every mutation appends to in the same transaction.
//! - [`telemetry`]: logs and Prometheus metrics.
//! - [`leader`]: who runs the singleton loops (advisory lock, sole process,
//!   or a Kubernetes Lease through [`k8s`]).
//! - [`hub`]: tails the change log and fans events out to watch streams.
//! - [`status`]: the status page's read model (workers, routes, recent
//!   failovers and moves, followed from the hub).
//! - [`health`]: the leader's loops: heartbeat timeouts, failover, pending
//!   placement, expiry and idle collection.
//! - [`k8s`]: the `AppProxyRoute` mirror, worker-pod health, Lease, Events.
//! - [`backendai`]: the Backend.AI drop-in: its circuits and workers as our
//!   routes and workers, what each call of its API does, HS256 tokens,
//!   acknowledgements, the Redis event bus.
//! - [`api`]: the REST API (axum), auth, RFC 9457 errors, OpenAPI, SSE; and
//!   Backend.AI's coordinator API (`api::backendai`).
//! - [`client`]: the worker library (register, stream, apply, heartbeat);
//!   knows only [`wire`] and [`domain`], never the server side.
//! - [`config`]: plain configuration data (defaults, file, environment,
//!   flags); imports no subsystem.
//! - [`takeover`]: `import-backendai`: a Backend.AI App Proxy coordinator's
//!   workers, circuits and tokens read from its PostgreSQL and written here;
//!   `export-backendai`: ours written back into its schema (the way back).
//! - [`server`]: turns the configuration into each subsystem's settings and
//!   runs them; `main.rs` is command-line wiring only.

pub mod api;
pub mod backendai;
pub mod config;
pub mod health;
pub mod hub;
pub mod k8s;
pub mod leader;
pub mod request_id;
pub mod server;
pub mod status;
pub mod store;
pub mod takeover;
pub mod telemetry;
pub mod tls;
pub mod trace_context;

// The pure core and the worker library are crates of their own; their
// modules keep their paths here.
pub use appproxy_client as client;
pub use appproxy_core::{clock, domain, secret, wire};

pub use appproxy_client::install_crypto_provider;
