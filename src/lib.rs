//! appproxy-coordinator: the control plane of an application proxy.
//!
//! - [`domain`]: the pure core (routes, workers, validation, placement).
//! - [`store`]: PostgreSQL and embedded SQLite persistence with the change log.
//! - [`api`]: the REST API (axum), auth and RFC 9457 errors.
//! - [`config`], [`telemetry`]: typed configuration, logs and metrics.
//! - [`clock`]: the time of day every time-based decision reads (the system
//!   clock in production, a manual one in tests).

pub mod api;
pub mod client;
pub mod clock;
pub mod config;
pub mod domain;
pub mod health;
pub mod hub;
pub mod k8s;
pub mod leader;
pub mod server;
pub mod store;
pub mod telemetry;
