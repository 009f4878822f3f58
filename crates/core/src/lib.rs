//! The pure core of appproxy-coordinator, a crate of its own so the
//! compiler keeps it pure: nothing here performs I/O or knows about HTTP,
//! SQL or Kubernetes, and nothing here can import the coordinator.
//!
//! - [`domain`]: routes, workers, validation, placement, failover and health
//!   rules, URLs, the change events;
//! - [`wire`]: what a worker and the coordinator exchange;
//! - [`clock`]: the time of day every time-based decision reads (the system
//!   clock, or a manual one in tests);
//! - [`secret`]: secrets (never printed, compared as digests) and the shared
//!   bearer tokens.

pub mod clock;
pub mod domain;
pub mod secret;
pub mod wire;
