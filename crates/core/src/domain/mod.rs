//! The pure core: routes, workers, validation and placement.
//!
//! Nothing in here performs I/O, awaits, or knows about HTTP, SQL or Kubernetes.
//! Every decision the coordinator makes about *what* should happen lives here and
//! is unit-tested directly; the other modules decide *how* it happens.

pub mod app_filter;
pub mod events;
pub mod failover;
pub mod health;
pub mod limits;
pub mod placement;
pub mod placer;
pub mod recovery;
pub mod route;
pub mod route_json;
pub mod schemas;
pub mod served;
pub mod types;
pub mod url;
pub mod validate;
pub mod worker;

pub use app_filter::AppFilter;
pub use placement::{Assignment, PlacementError};
pub use route::{
    Access, CircuitInfo, Frontend, FrontendMode, FrontendRequest, HealthCheck, Route, RouteKey,
    RoutePatch, RouteSpec, RouteStatus, StoredRoute, Target,
};
pub use types::{AppMode, Protocol, WorkerFrontend, WorkerStatus};
pub use url::UrlHome;
pub use validate::ValidationError;
pub use worker::{BackendAiWorker, PodRef, Worker, WorkerRegistration};

/// A position in the change log. Every committed mutation gets the next one.
pub type Revision = i64;
