//! The REST API, end to end over HTTP against the real router, on both the
//! embedded SQLite and a real PostgreSQL, one module per behaviour.

#[path = "../common/mod.rs"]
mod common;

mod observability;
mod openapi;
mod placement;
mod routes;
mod sessions;
mod ui;
mod validation;
mod workers;
