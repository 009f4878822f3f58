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
//!   PostgreSQL or Redis means.
//! - [`store`]: PostgreSQL and embedded SQLite persistence, with the change
//!   log every mutation appends to in the same transaction.
//! - [`telemetry`]: logs and Prometheus metrics.
//! - [`leader`]: who runs the singleton loops (advisory lock, sole process,
//!   or a Kubernetes Lease through [`k8s`]).
//! - [`hub`]: tails the change log and fans events out to watch streams.
//! - [`health`]: the leader's loops: heartbeat timeouts, failover, pending
//!   placement, expiry and idle collection.
//! - [`k8s`]: the `AppProxyRoute` mirror, worker-pod health, Lease, Events.
//! - [`backendai`]: the Backend.AI drop-in: its circuits and workers as our
//!   routes and workers, HS256 tokens, acknowledgements, the Redis event bus.
//! - [`api`]: the REST API (axum), auth, RFC 9457 errors, OpenAPI, SSE; and
//!   Backend.AI's coordinator API (`api::backendai`).
//! - [`client`]: the worker library (register, stream, apply, heartbeat);
//!   knows only [`wire`] and [`domain`], never the server side.
//! - [`config`]: plain configuration data (defaults, file, environment,
//!   flags); imports no subsystem.
//! - [`server`]: turns the configuration into each subsystem's settings and
//!   runs them; `main.rs` is command-line wiring only.

pub mod api;
pub mod backendai;
pub mod client;
pub mod clock;
pub mod config;
pub mod domain;
pub mod health;
pub mod hub;
pub mod k8s;
pub mod leader;
pub mod secret;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod wire;

/// Selects the TLS implementation (ring) for the server and HTTP clients.
/// Call once at start; later calls are no-ops.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
