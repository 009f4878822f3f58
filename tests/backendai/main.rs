//! Backend.AI drop-in: the coordinator API that the unmodified Backend.AI
//! Manager and App Proxy workers call, on both backends, and the event bus
//! against the real Redis on 127.0.0.1:6379, and over TLS (`rediss://`)
//! against a Redis server each TLS test starts. (The real worker end to end
//! is `make e2e-backendai`.)

#[path = "../common/mod.rs"]
mod common;

mod bus;
mod discovery;
mod filters;
mod health_detail;
mod manager;
mod recovery;
mod resend;
mod security;
mod sessions;
mod tls;
mod workers;
